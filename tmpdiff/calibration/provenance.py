"""What made the engines a bench judged, and where it ran: a block every bench report records.

An int8/fp8 graph's scales follow from calibration tensors whose last bits depend on the kernels that computed them,
so the same export recipe gives another graph on another host (the export section of the README). A committed result
therefore names, per precision, the graph's hash, the host its calibration was captured on, and the engine's backend
and device, beside the host the bench itself ran on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tmpdiff.formats.manifest import Manifest, engine_key


def bench_host(device: str = "cpu") -> dict:
    """The machine a bench runs on: the engines' device label and torch's version and CPU kernel set."""
    import torch

    from tmpdiff.engines.device import device_label

    return {"device": device_label(device), "torch": torch.__version__,
            "torch_kernels": torch.backends.cpu.get_cpu_capability()}


def build_provenance(build_dir: Path, manifest: Manifest, precisions: Sequence[str], backend: str = "ort",
                     device: str = "cpu") -> dict:
    """Per precision the bench used: its graph's sha256, where its calibration was captured (None for precisions
    exported before that was recorded, and for unquantized ones), and the engine's backend version, device and
    sha256; with the build directory, the model id and the bench host."""
    per_precision = {}
    for name in precisions:
        entry = manifest.precisions[name]
        engine = manifest.engines.get(engine_key(backend, device, name))
        calibration = (entry.quantization or {}).get("calibration") or {}
        per_precision[name] = {
            "onnx_sha256": entry.sha256, "reference_dtype": entry.reference_dtype,
            "calibration_captured_on": calibration.get("captured_on"),
            "engine": None if engine is None else {"backend": engine.backend, "backend_version": engine.backend_version,
                                                   "device": engine.device, "sha256": engine.sha256}}
    return {"build": str(build_dir), "model_id": manifest.model_id, "host": bench_host(device),
            "precisions": per_precision}


def provenance_line(provenance: dict) -> str:
    """One markdown line: the bench host and where each quantized precision's calibration was captured."""
    host = provenance["host"]
    captured = sorted({_captured_label(p["calibration_captured_on"]) for p in provenance["precisions"].values()
                       if p["calibration_captured_on"] is not None})
    where = "; ".join(captured) if captured else "not recorded (exported before it was)"
    return (f"Ran on {host['device']}, torch {host['torch']} ({host['torch_kernels']} kernels). Calibration of the "
            f"quantized graphs captured with {where}.")


def _captured_label(captured: dict) -> str:
    kernels = f" ({captured['kernels']} kernels)" if captured.get("kernels") else ""
    return f"torch {captured.get('torch')} on {captured.get('device')}{kernels}"
