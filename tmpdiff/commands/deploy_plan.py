"""`tmpdiff deploy-plan`: a TMPQ-DM plan's mixed-precision layer configurations as engines of the build.

Each configuration that is not one precision for every layer is traced from the super-network (the build's saved
quantizer states, so the graph computes what the search evaluated), rewritten to standard ONNX ops, parity-checked
(`export.mixed`), written under BUILD/mixed/<name>/ and recorded in the manifest with its hash and the export keys
it was made from. Uniform configurations run on the precision's own engine. Afterwards `tmpdiff run BUILD --schedule
PLAN` executes the plan: per step, the plan's timestep on its configuration's engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.formats.atomic import directory_lock, sha256_file
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import MixedEntry, load_manifest, mixed_name, mixed_problem, save_manifest
from tmpdiff.formats.tmpq_plan import load_tmpq_plan


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
    manifest = load_manifest(build_dir)
    if plan.model_id != manifest.model_id:
        raise TmpdiffError(f"the plan was searched on {plan.model_id!r}, the build holds {manifest.model_id!r}", plan_path)
    with directory_lock(build_dir, wait, on_wait=on_progress):
        manifest = load_manifest(build_dir)  # as it is now that we hold the lock
        rows, supernet = [], None
        for config in plan.configs:
            counts = dict(Counter(config))
            if len(counts) == 1:
                rows.append(DeployedConfig(config[0], counts, "uniform", None))
                continue
            name = mixed_name(plan.layers, list(config))
            if mixed_problem(build_dir, manifest, name) is None:
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
    from tmpdiff.models.registry import adapter_for_config

    rel = f"mixed/{name}/model.onnx"
    path = build_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    parity = export_mixed(supernet, config, adapter_for_config(manifest.denoiser_config), path)
    sources = {p: manifest.precisions[p].key for p in sorted(set(config) - {"fp32"})}
    return MixedEntry(layers=layers, precisions=config, onnx=rel, sha256=sha256_file(path),
                      ort_optimization=optimization_level(config), parity_error=parity, sources=sources)
