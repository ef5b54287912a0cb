"""The precision table (design §3): what each precision name means to modelopt, TensorRT and ORT."""

from __future__ import annotations

from dataclasses import dataclass

from tmpdiff.errors import TmpdiffError


@dataclass(frozen=True)
class Precision:
    """One precision level: how it is quantized and which opsets its two graphs need."""

    name: str
    modelopt_cfg: str | None  # name of a modelopt.torch.quantization config, None = no quantization
    description: str
    ort_opset: int
    trt_opset: int
    needs_cuda: bool = False
    cost_rank: int = 0  # 0 = reference; larger = cheaper on the intended hardware


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in [
        Precision("fp32", None, "fp32 reference", 19, 19, cost_rank=0),
        Precision("fp16", None, "fp16 weights and activations (I/O stays fp32)", 19, 19, cost_rank=1),
        Precision("int8", "INT8_DEFAULT_CFG", "W8A8 int8, per-channel weights, per-tensor activations", 19, 19,
                  cost_rank=2),
        Precision("int8-sq", "INT8_SMOOTHQUANT_CFG", "W8A8 int8 with SmoothQuant", 19, 19, cost_rank=2),
        Precision("fp8", "FP8_DEFAULT_CFG", "W8A8 float8 e4m3, per-tensor", 19, 19, cost_rank=2),
        Precision("int4", "INT4_AWQ_CFG", "W4A16 int4 AWQ, block-wise weights", 21, 19, cost_rank=3),
        Precision("nvfp4", "NVFP4_DEFAULT_CFG", "W4A4 nvfp4 (Blackwell)", 21, 21, needs_cuda=True, cost_rank=4),
    ]
}

# Layers that stay high precision by default, as TensorRT's diffusion demo keeps them: time and
# condition embeddings, patch / position embeddings, input and output projections, final norms.
# modelopt wildcards, matched against quantizer names such as "blocks.0.attn1.to_q.input_quantizer".
HIGH_PRECISION_PATTERNS: tuple[str, ...] = (
    "*pos_embed*", "*patch_embed*", "*x_embedder*", "*context_embedder*", "*caption_projection*",
    "*time_embed*", "*time_proj*", "*timestep_embedder*", "*time_text_embed*", "*add_embedding*",
    "*class_embedding*", "*adaln_single*", "*norm1.emb*", "*norm1.linear*", "*norm1_context.linear*", "*norm.linear*",
    "*norm_out*", "proj_out*", "conv_in.*", "conv_out.*", "*time_embedding*",
)


def get_precision(name: str) -> Precision:
    """Look up a precision by name; unknown names list the known ones."""
    if name not in PRECISIONS:
        raise TmpdiffError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
