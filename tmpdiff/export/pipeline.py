"""`tmpdiff export`: a diffusers model directory -> build/<model-id>/<precision>/model.onnx + manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tmpdiff.atomic import sha256_file
from tmpdiff.errors import TmpdiffError
from tmpdiff.export.manifest import (
    Manifest,
    PrecisionEntry,
    TensorSpecModel,
    load_manifest,
    model_content_hash,
    save_manifest,
)
from tmpdiff.export.onnx_export import export_onnx
from tmpdiff.models.loading import load_diffusers_model, read_model_config
from tmpdiff.models.registry import adapter_for_config

SUPPORTED_PRECISIONS = ("fp32",)
FP32_OPSET = 19


@dataclass
class ExportOutcome:
    precision: str
    onnx_path: Path
    skipped: bool


def parse_precisions(text: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8'], refusing names this build cannot export."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise TmpdiffError("no precision given")
    unknown = [p for p in names if p not in SUPPORTED_PRECISIONS]
    if unknown:
        raise TmpdiffError(f"unknown precision {', '.join(unknown)}; supported: {', '.join(SUPPORTED_PRECISIONS)}")
    return names


def export_model(
    model_dir: Path,
    out_root: Path,
    precisions: list[str],
    model_id: str | None = None,
    on_progress: Callable[[str], None] = lambda _: None,
) -> tuple[Path, list[ExportOutcome]]:
    """Export each precision of a diffusers denoiser directory; up-to-date artifacts are kept (no-op)."""
    config = read_model_config(model_dir)
    adapter = adapter_for_config(config)
    model_id = model_id or model_dir.resolve().name
    build_dir = out_root / model_id
    model_hash = model_content_hash(model_dir)

    manifest = None
    if (build_dir / "manifest.json").is_file():
        manifest = load_manifest(build_dir)
        if manifest.model_sha256 != model_hash:
            manifest = None  # another model's (or changed weights') artifacts: rebuild everything
    if manifest is None:
        manifest = Manifest(
            model_id=model_id,
            architecture=adapter.architecture,
            model_sha256=model_hash,
            model_config={k: v for k, v in config.items() if not k.startswith("_")} | {"_class_name": config["_class_name"]},
            inputs=[TensorSpecModel.of(s) for s in adapter.input_specs()],
            outputs=[TensorSpecModel.of(s) for s in adapter.output_specs()],
        )

    model = None
    outcomes = []
    for precision in precisions:
        rel = f"{precision}/model.onnx"
        path = build_dir / rel
        entry = manifest.precisions.get(precision)
        if entry is not None and path.is_file() and sha256_file(path) == entry.sha256:
            on_progress(f"{precision}: up to date, skipped")
            outcomes.append(ExportOutcome(precision, path, skipped=True))
            continue
        on_progress(f"{precision}: exporting")
        if model is None:
            model = load_diffusers_model(model_dir)
        export_onnx(model, adapter, path, opset=FP32_OPSET)
        manifest.precisions[precision] = PrecisionEntry(onnx=rel, sha256=sha256_file(path), opset=FP32_OPSET)
        save_manifest(build_dir, manifest)
        outcomes.append(ExportOutcome(precision, path, skipped=False))
    return build_dir, outcomes
