"""Everything a calibration run sets up once: engines, runner, evaluator and the search problem."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tmpdiff.calibration.evaluator import METRICS, Evaluation, Evaluator
from tmpdiff.calibration.search import Problem
from tmpdiff.engines.loading import load_engines
from tmpdiff.formats.costs import CostsTable, load_costs
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MANIFEST_NAME, Manifest, load_manifest
from tmpdiff.formats.schedule import SchedulerRef
from tmpdiff.models.schedulers import check_distinct_timesteps, sampling_scheduler, set_sampling_timesteps
from tmpdiff.models.time_embedding_input import load_own_table
from tmpdiff.runtime.runner import ScheduledRunner, initial_noise


@dataclass
class CalibrationSession:
    build_dir: Path
    manifest: Manifest
    costs: CostsTable
    evaluator: Evaluator
    problem: Problem

    def scheduler_ref(self) -> SchedulerRef:
        """The scheduler the schedule is calibrated with (written into schedule.json)."""
        sampling = self.manifest.sampling
        return SchedulerRef(class_name=sampling.scheduler_class, config=sampling.scheduler_config)

    def with_metric(self, metric: str) -> Problem:
        """The same problem judged on another metric (evaluations stay cached)."""
        return replace(self.problem, metric=metric)


def _usable_costs(costs: CostsTable, manifest: Manifest, costs_path: Path) -> dict[str, float]:
    """The table's step costs for this build. A measured table must be for this model and name only exported
    precisions; a stated one (a device's figures) may be for any model (when it names none) and name more."""
    if costs.model_id is not None and costs.model_id != manifest.model_id:
        raise TmpdiffError(f"costs were {costs.origin} for model {costs.model_id!r}, this build is {manifest.model_id!r}",
                           costs_path)
    stray = sorted(set(costs.precisions) - set(manifest.precisions))
    if stray and costs.origin == "measured":
        raise TmpdiffError(f"costs name precisions that were not exported here: {', '.join(stray)} "
                           f"(exported: {', '.join(manifest.precisions)})", costs_path)
    return {p: c for p, c in costs.step_costs().items() if p in manifest.precisions}


def level_costs(build_dir: Path, manifest: Manifest, costs: CostsTable, costs_path: Path, backend: str, device: str,
                levels: Sequence[str] | None, reference: str) -> dict[str, float]:
    """Step costs of the levels a search may use: the table's precisions this build exported, narrowed to `levels`
    (the reference always kept); a TmpdiffError naming the costs file if one of them has no built engine."""
    usable = _usable_costs(costs, manifest, costs_path)
    if reference in costs.precisions and reference not in manifest.precisions:
        raise TmpdiffError(f"the reference precision {reference} was not exported for this build (exported: "
                           f"{', '.join(manifest.precisions)}): export it or choose another --reference",
                           build_dir / MANIFEST_NAME)
    if reference not in usable:
        raise TmpdiffError(f"no cost for the reference precision {reference} (the table has "
                           f"{', '.join(costs.precisions)}; this build exported {', '.join(manifest.precisions)}; "
                           f"--reference chooses another)", costs_path)
    built = manifest.built_precisions(backend, device)
    wanted = [p for p in usable if levels is None or p in levels or p == reference]
    unbuilt = [p for p in wanted if p not in built]
    if unbuilt:
        raise TmpdiffError(f"no {backend} engine built for {', '.join(unbuilt)}: run `tmpdiff build {build_dir}`"
                           f"{'' if backend == 'ort' else f' --backend {backend}'}", build_dir)
    return {p: usable[p] for p in wanted}


def check_steps(steps: int) -> None:
    """A calibrated schedule's step count: at least 2."""
    if steps < 2:
        raise TmpdiffError(f"a schedule needs at least 2 steps, got {steps}")


def open_session(build_dir: Path, costs_path: Path, steps: int, metric: str = "latent", reference: str = "fp32",
                 classes: Sequence[int] | None = None, seeds: Sequence[int] = (0, 1), backend: str = "ort",
                 device: str = "cpu", threads: int | None = None, levels: Sequence[str] | None = None,
                 on_evaluation: Callable[[Evaluation], None] = lambda _: None,
                 check: Callable[[Problem], object] = lambda _: None, workers: int | None = None,
                 address: str | None = None, on_notice: Callable[[str], None] = lambda _: None,
                 timesteps: Sequence[int] | None = None) -> CalibrationSession:
    """Check every input first (costs vs built engines, metric, calibration set), then load engines and run the reference.

    With `timesteps` (one per step, e.g. the timesteps a TMPQ-DM plan chose) every schedule, the all-reference one
    included, samples at exactly those, and the scheduler is checked to take them before any engine loads.
    With `workers`, evaluations run on that many Ray actors (`fanout`; `threads` is then each actor's, default
    cores // workers); this process keeps its own engines for timing."""
    if metric not in METRICS:
        raise TmpdiffError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    check_steps(steps)
    manifest = load_manifest(build_dir)
    sampling = manifest.require_sampling(build_dir)
    costs = load_costs(costs_path)
    cost = level_costs(build_dir, manifest, costs, costs_path, backend, device, levels, reference)
    classes = list(range(sampling.num_classes)) if classes is None else list(classes)
    if not classes or not seeds:
        raise TmpdiffError("calibration set is empty: give at least one class and one seed")
    bad = [c for c in classes if not 0 <= c < sampling.num_classes]
    if bad:
        raise TmpdiffError(f"calibration classes {bad} out of range 0..{sampling.num_classes - 1}")
    if timesteps is not None:
        timesteps = tuple(int(t) for t in timesteps)
        # refused here, before engines load
        set_sampling_timesteps(sampling_scheduler(sampling, build_dir / MANIFEST_NAME), steps, timesteps)
    else:  # e.g. more steps than training timesteps
        check_distinct_timesteps(sampling_scheduler(sampling, build_dir / MANIFEST_NAME), steps)

    # Problem.create refuses a table without any level cheaper than the reference, before engines load.
    probe = Problem.create(steps, reference, cost, metric, evaluate=lambda z: None)  # type: ignore[arg-type]
    check(probe)  # e.g. an unreachable speedup target: refused before any engine runs
    own_table = load_own_table(build_dir, manifest)  # graphs taking time embeddings (--time-embedding-input)
    engines = load_engines(build_dir, manifest, backend, device, probe.all_levels, threads)
    runner = ScheduledRunner(engines, len(classes) * len(seeds), sampling.channels, sampling.image_size,
                             sampling.guidance_scale, sampling.null_class, sampling.num_classes, device=device,
                             nan_guard=True, owns_engines=True, own_time_embeddings=own_table)
    pool = None
    try:
        if workers is not None:
            from tmpdiff.calibration.fanout import sampling_pool

            labels = torch.tensor([c for _ in seeds for c in classes], dtype=torch.int64)
            noise = torch.cat([initial_noise(len(classes), sampling.channels, sampling.image_size, s) for s in seeds])
            pool = sampling_pool(build_dir, manifest, backend, device, probe.all_levels, threads, labels, noise,
                                 workers, address, on_notice, timesteps)
        evaluator = Evaluator(runner, sampling, classes, list(seeds), reference, steps, pool=pool, timesteps=timesteps)
    except BaseException:
        runner.close()
        if pool is not None:
            pool.close()
        raise

    problem = Problem(probe.steps, probe.reference, probe.levels, probe.cost, metric, reporting(evaluator, on_evaluation),
                      evaluator.prefetch, evaluator.width)
    return CalibrationSession(build_dir, manifest, costs, evaluator, problem)


def reporting(evaluator, on_evaluation: Callable[[Evaluation], None]) -> Callable[[Sequence[str]], Evaluation]:
    """`evaluator.evaluate`, telling `on_evaluation` about each schedule it actually ran (not its cached answers)."""

    def evaluate(schedule: Sequence[str]) -> Evaluation:
        before = evaluator.runs
        result = evaluator.evaluate(schedule)
        if evaluator.runs != before:  # run now, or run ahead and asked for the first time
            on_evaluation(result)
        return result

    return evaluate
