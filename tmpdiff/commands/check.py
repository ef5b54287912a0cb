"""`tmpdiff check`: a build directory is valid or clearly invalid, one line per problem with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmpdiff.formats.errors import TmpdiffError


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} -> {self.fix}"


def check_build(build_dir: Path, schedules: list[Path] | None = None, spot_check: bool = True) -> list[Problem]:
    """Every check that can fail, collected (not stopping at the first)."""
    from tmpdiff.engines.ort_build import ort_engine_problem
    from tmpdiff.export.onnx_io import load_onnx
    from tmpdiff.formats.atomic import interrupted_writes
    from tmpdiff.formats.manifest import engine_problem, graph_problems, load_manifest

    # a killed export/build leaves its in-flight temp; the next run of it (under the build lock) removes it
    problems = [Problem(str(path), "incomplete write left by an interrupted tmpdiff process",
                        "re-run the interrupted `tmpdiff export` or `tmpdiff build` (it removes this)")
                for path in interrupted_writes(build_dir)]
    try:
        manifest = load_manifest(build_dir)
    except TmpdiffError as exc:
        return [*problems, Problem(str(exc.path or build_dir), str(exc).split(": ", 1)[-1], "re-run `tmpdiff export`")]
    root = build_dir.resolve()
    for name, entry in manifest.precisions.items():
        broken = graph_problems(build_dir, entry)
        for path, problem in broken:
            problems.append(Problem(str(path), f"{name}: {problem}", f"re-run `tmpdiff export --precisions {name}`"))
        for rel, _ in [] if broken else entry.graphs():
            try:
                load_onnx(root / rel, root)
            except TmpdiffError as exc:
                problems.append(Problem(str(root / rel), str(exc).split(": ", 1)[-1], "re-run `tmpdiff export`"))
    for key, engine in manifest.engines.items():
        if engine.backend == "ort":
            problem = ort_engine_problem(build_dir, manifest, engine, engine.build_flags.get("device", "cpu"))
        else:  # the TensorRT version and GPU are checked where TensorRT runs (`tmpdiff run --backend trt`)
            problem = engine_problem(build_dir, manifest, engine)
        if problem is not None:
            problems.append(Problem(str(build_dir / engine.path), f"engine {key}: {problem}",
                                    f"run `tmpdiff build {build_dir} --backend {engine.backend}` on the target machine"))
    for schedule_path in schedules or []:
        from tmpdiff.formats.schedule import load_schedule

        try:
            schedule = load_schedule(schedule_path)
        except TmpdiffError as exc:
            problems.append(Problem(str(schedule_path), str(exc).split(": ", 1)[-1], "re-run `tmpdiff calibrate`"))
            continue
        missing = sorted(set(schedule.precisions) - set(manifest.precisions))
        if missing:
            problems.append(Problem(str(schedule_path), f"uses {', '.join(missing)}, not exported here",
                                    f"export them or re-run `tmpdiff calibrate {build_dir}`"))
    if spot_check and not problems:
        problems += _spot_check(build_dir, manifest)
    return problems


def _spot_check(build_dir: Path, manifest) -> list[Problem]:
    """Each precision vs fp32 on one random input: within 3x the error the manifest recorded (plus a floor)."""
    from tmpdiff.engines.ort import OrtEngine
    from tmpdiff.models.registry import adapter_for_config

    if "fp32" not in manifest.precisions:
        return []
    adapter = adapter_for_config(manifest.denoiser_config)
    feeds = {k: v.numpy() for k, v in adapter.sample_inputs(adapter.default_dims(2), seed=99).items()}
    reference = next(iter(OrtEngine(build_dir / manifest.precisions["fp32"].onnx).infer(feeds).values()))
    problems = []
    for name, entry in manifest.precisions.items():
        got = next(iter(OrtEngine(build_dir / entry.onnx, name, optimization=entry.ort_optimization).infer(feeds).values()))
        error = float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-12))
        if not np.isfinite(error) or error > 3 * entry.error_vs_fp32 + 1e-4:
            problems.append(Problem(str(build_dir / entry.onnx), f"{name} differs from fp32 by {error:.2e}; the manifest "
                                    f"recorded {entry.error_vs_fp32:.2e}", f"re-run `tmpdiff export --precisions {name}`"))
    return problems
