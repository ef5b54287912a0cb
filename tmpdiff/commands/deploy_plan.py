"""`tmpdiff deploy-plan`: a TMPQ-DM plan's mixed-precision layer configurations as engines of the build.

Each configuration that is not one precision for every layer is traced from the super-network (the build's saved
quantizer states, so the graphs compute what the search evaluated) and written under BUILD/mixed/<name>/ as an ORT
twin (standard ONNX ops) and a TensorRT graph (Q/DQ on the build's 16-bit base), both parity-checked (`export.mixed`),
and recorded in the manifest with their hashes and the export keys they were made from. Uniform configurations run
on the precision's own engine. Afterwards `tmpdiff run BUILD --schedule PLAN` executes the plan: per step, the plan's
timestep on its configuration's engine (ORT: the twin; TensorRT: the plan `tmpdiff build --backend trt` builds from
the TensorRT graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.formats.atomic import check_confined, directory_lock, sha256_file
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import (
    TMPQ_ON_PLAIN,
    MixedEntry,
    load_manifest,
    mixed_name,
    mixed_problem,
    save_manifest,
)
from tmpdiff.formats.tmpq_plan import load_tmpq_plan
from tmpdiff.runtime.plan import tmpq_precision_plan


@dataclass(frozen=True)
class DeployedConfig:
    name: str  # the engine a step of this configuration runs
    precisions: dict[str, int]  # precision -> layers
    status: str  # "uniform", "deployed", "up to date"
    parity_error: float | None


def deploy_plan(build_dir: Path, plan_path: Path, model_dir: Path, *, wait: float = 3600.0,
                on_progress: Callable[[str], None] = lambda _: None) -> list[DeployedConfig]:
    """Deploy every mixed configuration of the plan that is missing or stale; returns one row per configuration."""
    from collections import Counter

    plan = load_tmpq_plan(plan_path)
    tmpq_precision_plan(plan, plan_path)  # what `run` refuses (e.g. timesteps a schedule cannot take) is not deployed either
    manifest = load_manifest(build_dir)
    problem = plan.build_problem(manifest)
    if problem is not None:
        raise TmpdiffError(problem, plan_path)
    if manifest.time_embedding_input is not None and any(len(set(c)) > 1 for c in plan.configs):
        raise TmpdiffError(f"the build's graphs take time embeddings (--time-embedding-input), its mixed layer "
                           f"configurations' graphs the timestep: {TMPQ_ON_PLAIN}", build_dir / "manifest.json")
    with directory_lock(build_dir, wait, on_wait=on_progress):
        manifest = load_manifest(build_dir)  # as it is now that we hold the lock
        rows, supernet = [], None
        for config in plan.configs:
            counts = dict(Counter(config))
            if len(counts) == 1:
                rows.append(DeployedConfig(plan.uniform_engine(config), counts, "uniform", None))
                continue
            name = mixed_name(plan.layers, list(config))
            if mixed_problem(build_dir, manifest, name, "trt") is None and mixed_problem(build_dir, manifest, name) is None:
                rows.append(DeployedConfig(name, counts, "up to date", manifest.mixed[name].parity_error))
                continue
            if supernet is None:
                supernet = _supernet(build_dir, model_dir, plan, on_progress)
            on_progress(f"{name}: exporting {', '.join(f'{n} {p}' for p, n in counts.items())}")
            entry = _export(build_dir, manifest, supernet, plan.layers, list(config), name)
            manifest.mixed[name] = entry
            save_manifest(build_dir, manifest)
            rows.append(DeployedConfig(name, counts, "deployed", entry.parity_error))
    return rows


def _supernet(build_dir: Path, model_dir: Path, plan, on_progress: Callable[[str], None]):
    from tmpdiff.export.supernet import supernet_from_build

    quantized = sorted({p for config in plan.configs for p in config} - {"fp32"})
    on_progress(f"building the super-network from the saved quantizer states of {', '.join(quantized)}")
    supernet = supernet_from_build(build_dir, model_dir, quantized)
    if list(supernet.layers) != list(plan.layers):
        raise TmpdiffError(f"the plan names {len(plan.layers)} layers, the build's super-network has "
                           f"{len(supernet.layers)} ({supernet.layers[0]}, ...): search the plan on this build")
    return supernet


def _export(build_dir: Path, manifest, supernet, layers: list[str], config: list[str], name: str) -> MixedEntry:
    from tmpdiff.export.mixed import export_mixed, optimization_level
    from tmpdiff.export.twin_match import uniform_twins_of
    from tmpdiff.models.registry import adapter_for_config

    directory = build_dir / "mixed" / name
    check_confined(directory)
    trt_base = _trt_base(manifest, config)
    new = not directory.exists()
    try:
        # each quantized layer is checked against the uniform export of its precision (`export.twin_match`)
        graphs = export_mixed(supernet, config, adapter_for_config(manifest.denoiser_config), directory, trt_base,
                              uniform_twins=uniform_twins_of(build_dir, manifest, config))
    except BaseException:
        if new and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # a refused configuration leaves no empty folder behind
        raise
    rel = f"mixed/{name}"
    sources = {p: manifest.precisions[p].key for p in sorted(set(config) - {"fp32"})}
    return MixedEntry(layers=layers, precisions=config, onnx=f"{rel}/model.onnx",
                      sha256=sha256_file(directory / "model.onnx"), ort_optimization=optimization_level(config),
                      parity_error=graphs.parity_error, sources=sources, trt_onnx=f"{rel}/model.trt.onnx",
                      trt_sha256=sha256_file(directory / "model.trt.onnx"), trt_base=trt_base,
                      trt_parity_error=graphs.trt_parity_error, census=graphs.census)


def _trt_base(manifest, config: list[str]) -> str:
    """The 16-bit type the uniform exports' TensorRT graphs were made on (one for the whole build)."""
    bases = {(manifest.precisions[p].quantization or {}).get("trt_base", "float16") for p in set(config) - {"fp32"}}
    if len(bases) != 1:
        raise TmpdiffError(f"the precisions of this configuration were exported on different 16-bit bases "
                           f"({', '.join(sorted(bases))}): re-export them with one --trt-dtype")
    return bases.pop()
