"""TMPQ-DM in tmpdiff: per-layer costs of a build, the joint (timesteps, per-layer precision) search, the plan.

The super-network comes from the build's saved quantizer state (`export.supernet`), so what is searched is what the
engines were exported from; costs come from the per-layer table measured on the engines (`engines.layer_costs`). The
budget is a speedup over the fp32 model at the reference step count, predicted from that table; candidates over it are
discarded before they are evaluated. The result is judged again on held-out seeds against the fp32 reference and the
single-axis baselines (fewer steps at one precision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tmpdiff.calibration.knapsack import within_budget
from tmpdiff.calibration.tmpq_eval import CandidateEvaluator, PlanEvaluator, fitness_of
from tmpdiff.calibration.tmpq_search import Candidate, SearchResult, SearchSettings, TmpqSearch, tmpq_groups
from tmpdiff.engines.layer_costs import profile_layers
from tmpdiff.export.half_convolutions import fp32_compute
from tmpdiff.export.supernet import SuperNet, layer_macs, supernet_from_build
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.layer_costs import LayerCostsTable
from tmpdiff.formats.manifest import Manifest, load_manifest
from tmpdiff.formats.precisions import get_precision
from tmpdiff.formats.schedule import SchedulerRef
from tmpdiff.formats.tmpq_plan import TmpqPlan
from tmpdiff.models.adapter import model_dtype
from tmpdiff.models.registry import adapter_for_config
from tmpdiff.models.schedulers import sampling_scheduler, train_timesteps


def measure_layer_costs(build_dir: Path, model_dir: Path, precisions: Sequence[str] | None = None, batch: int = 20,
                        warmup: int = 3, repeats: int = 20, threads: int | None = None, backend: str = "ort",
                        on_start: Callable[[list[str]], None] = lambda _: None) -> LayerCostsTable:
    """The per-layer costs table of a build on `backend` (ort: ORT-CPU engines; trt: TensorRT plans on the GPU): the
    super-network names the layers and counts their MACs."""
    if backend == "trt":  # no TensorRT here is the first thing to say, before which plans are built
        from tmpdiff.engines.trt_build import load_tensorrt

        load_tensorrt()
    supernet = supernet_from_build(build_dir, model_dir, precisions)
    manifest = load_manifest(build_dir)
    engines = [unquantized_engine(build_dir, manifest, supernet, backend),
               *(p for p in supernet.precisions if p != "fp32")]
    adapter = adapter_for_config(manifest.denoiser_config)
    inputs = adapter.sample_inputs(adapter.default_dims(1), seed=0)
    with fp32_compute():  # a 16-bit super-network (the build's model was loaded so) on CPU: `half_convolutions`
        macs = layer_macs(supernet, adapter.export_module(supernet.model, model_dtype(supernet.model)),
                          list(inputs.values()))
    if backend == "trt":
        from tmpdiff.engines.trt_layer_costs import profile_trt_layers

        return profile_trt_layers(build_dir, supernet.layers, macs, engines, batch, warmup, repeats, on_start)
    return profile_layers(build_dir, supernet.layers, macs, engines, batch, warmup, repeats, threads, on_start)


def unquantized_engine(build_dir: Path, manifest: Manifest, supernet: SuperNet, backend: str) -> str:
    """The engine the super-network's unquantized layers are measured on: fp32's, or for the 16-bit super-network of a
    build exported from a 16-bit model the fp16 engine when it is built (its unquantized layers run at 16 bits)."""
    import torch

    built = manifest.built_precisions(backend, "cuda" if backend == "trt" else "cpu")
    half = model_dtype(supernet.model) == torch.float16
    if half and "fp16" in built:
        return "fp16"
    if "fp32" in built:
        return "fp32"
    also = " or fp16 (the quantized precisions were exported from a 16-bit model)" if half else ""
    raise TmpdiffError(f"no {backend} engine for the unquantized layers: export and build fp32{also}",
                       build_dir / "manifest.json")


@dataclass
class TmpqOptions:
    steps: int = 8
    speedup: float = 3.0  # predicted, over fp32 at `reference_steps`
    metric: str = "ssim"
    reference_steps: int = 20
    classes: Sequence[int] = tuple(range(10))
    seeds: Sequence[int] = (100,)  # calibration seeds (the search's)
    holdout_seeds: Sequence[int] = (1000, 1001, 1002, 1003, 1004)  # never seen by the search
    precisions: Sequence[str] | None = None  # per-layer choices (default: every precision of the costs table)
    settings: SearchSettings = field(default_factory=SearchSettings)


@dataclass
class TmpqOutcome:
    plan: TmpqPlan
    result: SearchResult
    holdout: dict[str, dict]  # name -> quality and predicted speedup on the held-out seeds


def _names(supernet: SuperNet, config: Sequence[int]) -> list[str]:
    return [supernet.precisions[i] for i in config]


@dataclass(frozen=True)
class EvaluationSets:
    """Where a search samples its candidates and where the result is judged: evaluator factories over the
    super-network for the calibration set and the held-out set, the sampler both run, and what the sets are."""

    calibration: Callable[[SuperNet], CandidateEvaluator]
    holdout: Callable[[SuperNet], CandidateEvaluator]
    train_timesteps: int
    scheduler: SchedulerRef
    calibration_record: dict  # e.g. {"seeds": [...], "classes": [...]} or {"seeds": [...], "prompts": [...]}
    holdout_record: dict


def class_conditional_sets(build_dir: Path, classifier_dir: Path, options: TmpqOptions) -> EvaluationSets:
    """A class-conditional build: `options.classes` x `options.seeds` (calibration) and x `options.holdout_seeds`,
    sampled by the runtime's loop with the build's scheduler, judged by the bundled classifier."""
    manifest = load_manifest(build_dir)
    sampling = manifest.require_sampling(build_dir)
    adapter = adapter_for_config(manifest.denoiser_config)

    def evaluator(seeds: Sequence[int]) -> Callable[[SuperNet], PlanEvaluator]:
        return lambda supernet: PlanEvaluator(supernet, adapter, sampling, classifier_dir, options.classes, seeds,
                                              options.reference_steps)

    return EvaluationSets(evaluator(options.seeds), evaluator(options.holdout_seeds),
                          train_timesteps(sampling_scheduler(sampling)),
                          SchedulerRef(class_name=sampling.scheduler_class, config=sampling.scheduler_config),
                          {"seeds": list(options.seeds), "classes": list(options.classes)},
                          {"seeds": list(options.holdout_seeds), "classes": list(options.classes)})


def check_held_out(calibration: dict, holdout: dict) -> None:
    """Refuse a held-out set that could hold a sample the search saw: a seed in both sets, with (class-conditional)
    the same classes in both, or (`prompts` in both records) any prompt in both. A pipeline call draws the noise of its
    whole prompt batch from the seed's one generator, so the first rows of a longer list get a shorter one's noise:
    equal lists are not the only way to repeat a (prompt, seed) sample."""
    seeds = sorted(set(calibration["seeds"]) & set(holdout["seeds"]))
    if not seeds:
        return
    if "prompts" not in calibration or "prompts" not in holdout:
        raise TmpdiffError(f"seed {seeds[0]} is both a calibration and a held-out seed")
    held = set(holdout["prompts"])
    shared = [p for p in calibration["prompts"] if p in held]
    if shared:
        raise TmpdiffError(f"seed {seeds[0]} is both a calibration and a held-out seed and prompt {shared[0]!r} is in "
                           "both prompt lists: the held-out judgement would see samples the search saw; give other "
                           "held-out seeds or prompts")


def search_plan(build_dir: Path, model_dir: Path, table: LayerCostsTable, options: TmpqOptions, sets: EvaluationSets,
                on_generation: Callable[[dict], None] = lambda _: None,
                on_status: Callable[[str], None] = lambda _: None, table_file: Path | None = None) -> TmpqOutcome:
    """Run the search on the calibration set, then judge the best plan and the baselines on the held-out set
    (`table_file`: where `table` was read, named in errors about it)."""
    check_held_out(sets.calibration_record, sets.holdout_record)
    manifest = load_manifest(build_dir)
    if table.model_id != manifest.model_id:
        raise TmpdiffError(f"the layer costs were measured for model {table.model_id!r}, this build is "
                           f"{manifest.model_id!r}", table_file)
    if manifest.time_embedding_input is not None:
        raise TmpdiffError("the build's graphs take time embeddings (--time-embedding-input); search TMPQ-DM plans on "
                           "a build exported without it", build_dir / "manifest.json")
    table = unquantized_view(table, manifest, table_file)
    on_status("building the super-network from the build's quantizer state")
    choices = list(options.precisions or table.precisions)
    # a 16-bit build's fp16 engine is its unquantized layers' engine: named, it means the unquantized alternative
    choices = list(dict.fromkeys("fp32" if p == table.unquantized_engine else p for p in choices))
    unknown = sorted(set(choices) - set(table.precisions))
    if unknown:
        raise TmpdiffError(f"the layer costs table has no {', '.join(unknown)} (it has {', '.join(table.precisions)})",
                           table_file)
    supernet = supernet_from_build(build_dir, model_dir, [p for p in choices if p != "fp32"])
    if supernet.layers != table.names or "fp32" not in table.precisions:
        raise TmpdiffError("the layer costs table is not for this build's layers (or has no fp32): measure it again "
                           "with `tmpdiff layer-costs`", table_file)
    groups = tmpq_groups(options.steps, sets.train_timesteps)
    steps = len(groups)
    reference_ms = table.config_ms(table.uniform("fp32")) * options.reference_steps
    budget = reference_ms / options.speedup

    def cost(cand: Candidate) -> float:
        return sum(table.config_ms(_names(supernet, c)) for c in cand.configs)

    on_status(f"sampling the {table.engine_of('fp32')} reference on the calibration set")
    evaluator = sets.calibration(supernet)

    def fitness(cand: Candidate) -> float:
        latents = evaluator.sample([_names(supernet, c) for c in cand.sampling_configs()], cand.sampling_timesteps())
        return fitness_of(evaluator.quality(latents), options.metric)

    uniform_costs = {i: table.config_ms(table.uniform(p)) * steps for i, p in enumerate(supernet.precisions)}
    fitting = [i for i, c in uniform_costs.items() if within_budget(c, budget)]
    init = max(fitting, key=uniform_costs.get) if fitting else min(uniform_costs, key=uniform_costs.get)
    search = TmpqSearch(groups, len(supernet.layers), len(supernet.precisions), fitness, cost, budget, options.settings,
                        init_config=tuple([init] * len(supernet.layers)), on_generation=on_generation)
    result = search.run()
    plan = _plan(manifest, supernet, table, result, options, sets.scheduler, reference_ms, budget, steps,
                 sets.calibration_record)
    on_status("judging on the held-out set")
    holdout = judge(plan, supernet, sets.holdout(supernet), table, options, reference_ms)
    plan.measured = {"calibration": sets.calibration_record | {"metric": options.metric, "fitness": result.fitness},
                     "holdout": sets.holdout_record | {"results": holdout}}
    return TmpqOutcome(plan, result, holdout)


def unquantized_view(table: LayerCostsTable, manifest: Manifest, table_file: Path | None) -> LayerCostsTable:
    """The costs table the search reads: its "fp32" column is the unquantized layers' cost. A build whose quantized
    precisions were exported from a 16-bit model has that model as its super-network, and its unquantized layers run
    at 16 bits: there the fp16 engine's column stands for it when the table has no fp32 (a GPU build's usual case)."""
    if "fp32" in table.precisions:
        return table
    quantized = [p for p in table.precisions if p in manifest.precisions and get_precision(p).modelopt_cfg is not None]
    dtypes = {manifest.precisions[p].reference_dtype for p in quantized}
    if dtypes == {"float16"} and "fp16" in table.precisions:
        return table.unquantized_as("fp16")
    raise TmpdiffError("the layer costs table has no fp32 column (the unquantized layers' cost): build and measure the "
                       "fp32 engine, or, for a build exported from a 16-bit model (`export --load-dtype float16`), the "
                       "fp16 one", table_file)


def engine_weight_bytes(supernet: SuperNet, config: Sequence[str]) -> int:
    """Weight bytes of the engine one layer configuration becomes: each switchable layer's weight at its precision's
    width (`BITS`; scales and zero points not counted) and its bias at the model's, every other parameter (norms,
    embeddings, the layers kept high precision) and the unquantized ("fp32") layers at the model's width (fp32, or
    16 bits for the super-network of a build exported from a 16-bit model)."""
    from tmpdiff.formats.layer_costs import BITS

    fixed = sum(p.numel() * p.element_size() for n, p in supernet.model.named_parameters() if ".alternatives." not in n)
    switched = 0.0
    for name, precision in zip(supernet.layers, config, strict=True):
        layer = supernet.switches[name].alternatives["fp32"]
        bits = layer.weight.element_size() * 8 if precision == "fp32" else BITS[precision][0]
        switched += layer.weight.numel() * bits / 8
        switched += 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    return int(fixed + switched)


def _plan(manifest: Manifest, supernet: SuperNet, table: LayerCostsTable, result: SearchResult, options: TmpqOptions,
          scheduler: SchedulerRef, reference_ms: float, budget: float, steps: int, calibration: dict) -> TmpqPlan:
    best = result.best
    step_configs = [tuple(_names(supernet, c)) for c in best.sampling_configs()]
    distinct = list(dict.fromkeys(step_configs))
    bitops = sum(table.config_bitops(list(c)) for c in step_configs)
    reference_bitops = table.config_bitops(table.uniform("fp32")) * options.reference_steps
    s = options.settings
    return TmpqPlan(
        # the build searched on: a plan runs and deploys only where the same model and quantizers are
        model_id=manifest.model_id, model_sha256=manifest.model_sha256,
        export_keys={p: manifest.precisions[p].key for p in supernet.precisions if p in manifest.precisions},
        steps=steps, timesteps=best.sampling_timesteps(),
        scheduler=scheduler, layers=supernet.layers, configs=[list(c) for c in distinct],
        step_configs=[distinct.index(c) for c in step_configs],
        reference={"precision": table.engine_of("fp32"), "steps": options.reference_steps, "ms": reference_ms},
        unquantized_engine=table.unquantized_engine,
        predicted={"ms": result.cost, "speedup": reference_ms / result.cost, "budget_ms": budget,
                   "target": {"speedup": options.speedup}, "bitops_per_sample": bitops,
                   "bitops_vs_reference": bitops / reference_bitops,
                   "engine_ms": {f"config{i}": table.config_ms(list(c)) for i, c in enumerate(distinct)},
                   # every distinct configuration is one engine held in memory for the whole run
                   "engine_weight_bytes": {f"config{i}": engine_weight_bytes(supernet, c) for i, c in enumerate(distinct)},
                   "fp32_weight_bytes": engine_weight_bytes(supernet, supernet.uniform("fp32"))},
        search={"method": "tmpq-dm evolutionary", "mode": "consistent" if s.consistent else "per-step",
                "max_configs": 1 if s.consistent else s.max_configs, "population": s.population, "select": s.select,
                "mutations": s.mutations, "crossovers": s.crossovers, "m_prob": s.m_prob, "generations": result.generations,
                "precisions": supernet.precisions, "metric": options.metric, "calibration_seeds": calibration["seeds"],
                "seed": s.seed, "evaluations": result.evaluations, "rejected": result.rejected,
                "over_budget": result.over_budget, "over_cap": result.over_cap,
                "seconds": round(result.seconds, 1), "history": result.history},
        costs={"table": table.format, "device": table.device, "backend": f"{table.backend} {table.backend_version}",
               "batch": table.batch, "measured_at": table.measured_at})


def judge(plan: TmpqPlan, supernet: SuperNet, evaluator: CandidateEvaluator, table: LayerCostsTable,
          options: TmpqOptions, reference_ms: float) -> dict[str, dict]:
    """Quality (reference-free: classifier accuracy / prompt adherence and confidence; beside it SSIM/PSNR/latent
    error vs fp32 at the reference step count) and predicted speedup of the plan and the single-axis baselines, on
    the held-out set `evaluator` samples."""
    steps = plan.steps
    fp32, int8 = supernet.uniform("fp32"), supernet.uniform("int8") if "int8" in supernet.precisions else None
    base = table.engine_of("fp32")  # the unquantized model: fp32, or a 16-bit build's 16 bits
    entries: dict[str, tuple[list[list[str]], list[int] | None]] = {
        f"{base} {options.reference_steps} steps (reference)": ([fp32] * options.reference_steps, None),
        f"{base} {steps} steps (scheduler spacing)": ([fp32] * steps, None),
        f"{base} at the plan's {steps} timesteps": ([fp32] * steps, plan.timesteps),
        "plan (timesteps + per-layer precision)": (plan.step_precisions(), plan.timesteps),
    }
    if int8 is not None:
        entries[f"int8 {steps} steps (scheduler spacing)"] = ([int8] * steps, None)
    results = {}
    for name, (configs, timesteps) in entries.items():
        quality = evaluator.quality(evaluator.sample(configs, timesteps))
        ms = sum(table.config_ms(c) for c in configs)
        results[name] = quality | {"predicted_ms": ms, "predicted_speedup": reference_ms / ms,
                                   "bitops_per_sample": sum(table.config_bitops(c) for c in configs)}
    return results
