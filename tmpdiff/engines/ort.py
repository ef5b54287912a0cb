"""ONNX Runtime engine (CPU provider here; CUDA / TensorRT execution providers on GPU machines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tmpdiff.errors import TmpdiffError
from tmpdiff.models.adapter import TensorSpec

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


def session_options(threads: int | None = None, optimization: str = "all"):
    """ORT session options set deliberately: thread count and graph optimisation level."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise TmpdiffError(f"unknown ORT optimisation level {optimization!r}; choose from {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits; its default accuracy level 4 quantizes
    # the activations to int8 inside the kernel (W4A8). Level 1 keeps them fp32: the W4A16 that
    # TensorRT computes and that the parity test checks (1e-3 -> 2e-7 relative error, measured).
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


class OrtEngine:
    """An ONNX model loaded into an ORT session on the CPU provider."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None, optimization: str = "all") -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise TmpdiffError("ONNX file is missing", self.path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options(threads, optimization), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own pybind exception types for bad graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TmpdiffError(f"ONNX Runtime cannot load this model ({first})", self.path) from None

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), tuple(i.shape)) for i in self.session.get_inputs()]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), tuple(o.shape)) for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on host arrays."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))


class OrtDenoiser:
    """Adapts a one-output denoiser engine to the sampler's call (torch tensors in and out, no copies)."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.names = [s.name for s in engine.input_specs]
        self.output = engine.output_specs[0].name

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.names, (latent.numpy(), timestep.numpy(), class_labels.numpy()), strict=True))
        return torch.from_numpy(self.engine.infer(feeds)[self.output])
