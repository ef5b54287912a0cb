"""The precision table (design §3): every per-precision fact in one place.

Each stage reads what it needs from here: export (modelopt config, opsets, rewrite kind, parity
tolerance, ORT optimisation level), the TensorRT backend (oldest GPU that runs it), the runtime (the
order a non-finite step falls back along).
"""

from __future__ import annotations

from dataclasses import dataclass

from tmpdiff.formats.errors import TmpdiffError


@dataclass(frozen=True)
class Precision:
    """One precision level: how it is quantized, which opsets its graphs need, how it is checked and run."""

    name: str
    modelopt_cfg: str | None  # modelopt.torch.quantization config name; None = not quantized (plain graph)
    ort_opset: int  # opset of the ONNX Runtime graph (standard Q/DQ ops)
    trt_opset: int  # opset of the TensorRT graph file (modelopt's trt:: Q/DQ ops; int4's 16-bit graph needs 21)
    rewrite_kind: str | None  # which graph rewrite its Q/DQ nodes need (int8, fp8, int4); None = plain
    parity_tolerance: float  # plain graphs: ORT graph vs the torch model it came from; engine vs its graph, relative L2
    min_compute_capability: tuple[int, int]  # oldest NVIDIA GPU (major, minor) TensorRT runs it on
    ort_optimization: str = "all"  # ORT graph optimisation level its graph loads at
    needs_cuda: bool = False  # modelopt can only calibrate it on a GPU


# Parity: fp32 is the same maths on other kernels (float rounding only). fp16: both sides compute in
# half but accumulate differently (~1e-3 per layer). Quantized: the tolerance is how far an engine may be from
# its own exported graph's recorded output (`tmpdiff check`, the doctor) - an activation on a rounding tie in
# one backend and not the other moves one quantization step, which propagates. int4 is weight-only (W4A16):
# weights dequantize exactly, float rounding remains. The export accepts a quantized twin against its
# fake-quant model by a stricter rule relative to the measured quantization error (`exporter.parity_ok`).
# fp8: its float8 Q/DQ graph only loads at ORT's basic level (the extended level fuses it into
# MatMulIntegerToFloat, which rejects float8 inputs; ORT 1.31).
# Compute capability: TensorRT 10.5+ runs on Turing (7.5) and newer; the quantized rows follow the Model
# Optimizer support matrix: INT4 weight-only "Ampere and later", FP8 "Ada and later", NVFP4 "Blackwell".
_TABLE = (
    # name      modelopt config          ort trt  rewrite  parity  min CC
    Precision("fp32", None, 19, 19, None, 1e-4, (7, 5)),
    Precision("fp16", None, 19, 19, None, 2e-2, (7, 5)),
    Precision("int8-sq", "INT8_SMOOTHQUANT_CFG", 19, 19, "int8", 2e-2, (7, 5)),
    Precision("int8", "INT8_DEFAULT_CFG", 19, 19, "int8", 2e-2, (7, 5)),
    Precision("fp8", "FP8_DEFAULT_CFG", 19, 19, "fp8", 2e-2, (8, 9), ort_optimization="basic"),
    Precision("int4", "INT4_AWQ_CFG", 21, 21, "int4", 1e-4, (8, 0)),
    Precision("nvfp4", "NVFP4_DEFAULT_CFG", 21, 21, None, 2e-2, (10, 0), needs_cuda=True),
)
PRECISIONS: dict[str, Precision] = {p.name: p for p in _TABLE}
# Highest precision first (the table's order): a step whose output is not finite is re-run one place up.
PRECISION_ORDER: tuple[str, ...] = tuple(PRECISIONS)

# Layers that stay high precision by default. ModelOpt's diffusers example (examples/diffusers/quantization/utils.py,
# `filter_func_default`) keeps time_emb_proj, time_embedding, conv_in, conv_out, conv_shortcut, add_embedding,
# pos_embed, time_text_embed, context_embedder, norm_out and x_embedder; every one of those is kept here too (the
# UNet's resnet time projections `*time_emb_proj*` and 1x1 shortcut convolutions `*conv_shortcut*` among them), plus
# the other families' time and condition embeddings, patch embeddings, caption projections, adaLN modulation and
# output projections. modelopt wildcards, matched against quantizer names such as "blocks.0.attn1.to_q.input_quantizer".
# Changing this list changes every quantized precision's export key: existing builds re-export.
HIGH_PRECISION_PATTERNS: tuple[str, ...] = (
    "*pos_embed*", "*patch_embed*", "*x_embedder*", "*context_embedder*", "*caption_projection*",
    "*time_embed*", "*time_proj*", "*timestep_embedder*", "*time_text_embed*", "*add_embedding*",
    "*class_embedding*", "*adaln_single*", "*norm1.emb*", "*norm1.linear*", "*norm1_context.linear*", "*norm.linear*",
    "*norm_out*", "proj_out*", "conv_in.*", "conv_out.*", "*time_embedding*", "*time_emb_proj*", "*conv_shortcut*",
)


def get_precision(name: str) -> Precision:
    """Look up a precision by name; unknown names list the known ones."""
    if name not in PRECISIONS:
        raise TmpdiffError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def next_higher(precision: str, available: list[str]) -> str | None:
    """The next higher precision among `available` (None if `precision` is already the highest)."""
    index = PRECISION_ORDER.index(get_precision(precision).name)
    for candidate in reversed(PRECISION_ORDER[:index]):
        if candidate in available:
            return candidate
    return None
