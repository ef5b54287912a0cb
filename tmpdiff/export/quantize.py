"""Post-training quantization of a denoiser with nvidia-modelopt (fake quant on CPU).

The quantized torch state is kept as safetensors (weights as modified by AWQ/SmoothQuant, plus every
quantizer's amax and pre-quant scale) next to a JSON copy of the modelopt config, so an export can be
redone without recalibrating and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tmpdiff.formats.atomic import atomic_path, read_json_object, write_json
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import HIGH_PRECISION_PATTERNS, Precision

CalibrationBatch = dict[str, torch.Tensor]
STATE_NAME, CONFIG_NAME = "quant_state.safetensors", "quant_config.json"  # a quantized export's saved quantizers


def _linear_in_features(model: torch.nn.Module, skip: Sequence[str]) -> list[int]:
    from fnmatch import fnmatch

    sizes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(fnmatch(f"{name}.weight_quantizer", p) for p in skip):
            sizes.append(module.in_features)
    return sizes


def int4_block_size(model: torch.nn.Module, skip: Sequence[str], preferred: int = 128) -> int:
    """Largest block size <= preferred (128, 64, 32, 16) dividing every quantized Linear's in_features.

    A block that does not divide the reduction dimension makes modelopt pad the weight inside the
    exported graph, which neither TensorRT's int4 path nor a blocked DequantizeLinear accepts.
    """
    sizes = _linear_in_features(model, skip)
    for block in (128, 64, 32, 16):
        if block <= preferred and all(s % block == 0 for s in sizes):
            return block
    raise TmpdiffError(f"no int4 block size divides every Linear input width ({sorted(set(sizes))})")


def require_exportable(precision: Precision) -> None:
    """Refuse a precision this exporter cannot make: NVFP4 (modelopt calibrates it on CUDA tensors, and the export
    calibrates on the CPU; its TensorRT graph needs FP4 Q/DQ rewrites that are not written). With a GPU or without."""
    if precision.needs_cuda:
        raise TmpdiffError(
            f"{precision.name} quantization needs CUDA (modelopt's {precision.modelopt_cfg} calibrates on the GPU), "
            "and this exporter calibrates on the CPU: not supported yet, on any machine; export fp8 or int4 instead")


def check_kept_layers(weights: dict[str, list[int]], keep: Sequence[str]) -> None:
    """Refuse `--keep-high-precision` patterns that match every layer with a weight matrix or kernel (`weights`: tensor
    name -> shape, from the checkpoint's headers): nothing would be quantized, and modelopt fails mid-export."""
    from fnmatch import fnmatch

    layers = [name.removesuffix(".weight") for name, shape in weights.items()
              if name.endswith(".weight") and len(shape) >= 2]
    if layers and all(any(fnmatch(f"{layer}.weight_quantizer", p) for p in keep) for layer in layers):
        raise TmpdiffError(f"--keep-high-precision {','.join(keep)!r} matches every quantizable layer ({len(layers)} "
                           "of them), so nothing would be quantized: name only the layers to keep, or export fp32/fp16")


def preload_modelopt() -> None:
    """Import modelopt's quantization package before any model is loaded. Something its first import creates keeps
    the importing frames alive (seen with gc: an importlib frame chain back to the function that imported it), and a
    kept frame keeps its locals: imported from a function holding the model, it pinned the whole model in memory
    after the export had let go of it (found on a 220M-parameter UNet export)."""
    import modelopt.torch.quantization  # noqa: F401


def build_config(
    precision: Precision, model: torch.nn.Module, keep_high_precision: Sequence[str] = HIGH_PRECISION_PATTERNS
) -> dict[str, Any]:
    """The modelopt config for a precision, with sensitive layers left unquantized."""
    import modelopt.torch.quantization as mtq

    if precision.modelopt_cfg is None:
        raise TmpdiffError(f"{precision.name} is not a modelopt quantization")
    require_exportable(precision)
    config = copy.deepcopy(getattr(mtq, precision.modelopt_cfg))
    entries = list(config["quant_cfg"])
    if precision.name == "int4":
        block = int4_block_size(model, keep_high_precision)
        for entry in entries:
            cfg = entry.get("cfg") or {}
            if isinstance(cfg, dict) and "block_sizes" in cfg:
                cfg["block_sizes"] = {**cfg["block_sizes"], -1: block}
    # modelopt's defaults disable every "*proj_out.*" (an LLM rule); inside transformer blocks proj_out is
    # an ordinary GEMM (Flux single blocks: the largest one), so re-enable it there.
    entries.append({"quantizer_name": "*blocks.*proj_out*weight_quantizer", "enable": True})
    if precision.name != "int4":  # int4 is weight-only: its input quantizers stay off
        entries.append({"quantizer_name": "*blocks.*proj_out*input_quantizer", "enable": True})
    else:
        # W4A16 is a GEMM format: modelopt would block-quantize Conv kernels along their width. After the proj_out
        # rule (later entries win): SD1.5's `down_blocks.*.proj_out` is a 1x1 Conv2d (use_linear_projection=False).
        entries += [{"parent_class": c, "quantizer_name": "*", "enable": False} for c in _registered(CONV_CLASSES)]
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in keep_high_precision]
    # modelopt also wraps normalisation layers; quantizing their inputs adds error and no GEMM to speed up.
    entries += [{"parent_class": cls, "quantizer_name": "*", "enable": False} for cls in _registered(NORM_CLASSES)]
    config["quant_cfg"] = entries
    return config


NORM_CLASSES = ("nn.LayerNorm", "nn.GroupNorm", "nn.InstanceNorm2d", "nn.BatchNorm2d")
CONV_CLASSES = ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d")


def _registered(class_names: tuple[str, ...]) -> list[str]:
    """The names modelopt's QuantModuleRegistry knows (parent_class entries must name registered classes)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    names = []
    for name in class_names:
        try:
            QuantModuleRegistry[name]
        except KeyError:
            continue
        names.append(name)
    return names


def config_digest(config: dict[str, Any]) -> str:
    """Stable hash of a modelopt config (for artifact keys)."""
    return hashlib.sha256(json.dumps(_str_keys(config), sort_keys=True, default=str).encode()).hexdigest()


def _str_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


def calibration_digest(batches: Sequence[CalibrationBatch]) -> str:
    """Hash of the calibration tensors themselves, so a changed calibration set rebuilds."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            tensor = batch[name].detach().contiguous().cpu()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def quantize(
    model: torch.nn.Module, config: dict[str, Any], calibration: Sequence[CalibrationBatch], forward,
    in_place: bool = False,
) -> torch.nn.Module:
    """Insert modelopt quantizers into a copy of `model` (or, `in_place`, into `model` itself: no second copy of a
    multi-gigabyte model) and calibrate them on `calibration`.

    `forward(module, batch)` runs the denoiser on one calibration batch.
    """
    import modelopt.torch.quantization as mtq

    if not calibration:
        raise TmpdiffError("calibration set is empty: quantization needs at least one batch of denoiser inputs")
    quantized = (model if in_place else copy.deepcopy(model)).eval()

    def forward_loop(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calibration:
                forward(module, batch)

    # modelopt prints progress ("Inserted N quantizers") to stdout; keep stdout for the command's own output
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            return mtq.quantize(quantized, config, forward_loop)
        except RuntimeError as exc:
            if "no weight quantizer is enabled" not in str(exc):
                raise
            raise TmpdiffError("the quantization config leaves no layer's weights quantized (every one is kept in high "
                               "precision or disabled): name fewer layers in --keep-high-precision") from None


def export_qdq_in_model_dtype(model: torch.nn.Module, dtype: str = "Half") -> None:
    """Make every quantizer of a 16-bit `model` export its Q/DQ in the model's dtype ("Half"), not ModelOpt's default
    fp32 ("Float"). With "Float", ModelOpt's int8 exporter casts each weight to fp32 in the traced graph (an
    SDXL-size UNet's int8 export ran out of 23.5 GiB while tracing, where fp8 peaked at 17.6) and hands the fp32 result
    on (`export.upcast`). `dtype` "Float" sets the default back."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.trt_high_precision_dtype = dtype


def quantizer_census(model: torch.nn.Module) -> dict[str, int]:
    """Counts of enabled / disabled weight and input quantizers."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts = {"weight_enabled": 0, "weight_disabled": 0, "input_enabled": 0, "input_disabled": 0}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            kind = "weight" if name.endswith("weight_quantizer") else "input" if name.endswith("input_quantizer") else None
            if kind:
                counts[f"{kind}_{'enabled' if module.is_enabled else 'disabled'}"] += 1
    return counts


def save_quantized_state(model: torch.nn.Module, config: dict[str, Any], directory: Path) -> None:
    """Write the calibrated state: `quant_state.safetensors` + `quant_config.json` (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / STATE_NAME) as tmp:
        save_file(state, str(tmp))
    write_json(directory / CONFIG_NAME, config)


def restore_quantized(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Rebuild a quantized model from `save_quantized_state` output without recalibrating."""
    import modelopt.torch.quantization as mtq

    from tmpdiff.models.loading import load_safetensors

    config = read_json_object(directory / CONFIG_NAME)
    _int_keys(config)
    method = config.get("algorithm")
    method = method.get("method") if isinstance(method, dict) else method
    if method in ("smoothquant", "awq_full", "awq_clip"):
        # these need calibration data; here every calibrated value (amax, pre-quant scales, smoothed weights) comes
        # from the saved state, so quantizers are only inserted (weight-only max stats, then overwritten)
        config = {**config, "algorithm": "max"}
    state = load_safetensors(directory / STATE_NAME)
    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        quantized = mtq.quantize(quantized, config, forward_loop=None)
        _prepare_buffers(quantized, state)
        missing, unexpected = quantized.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "quantizer" not in m]:
        raise TmpdiffError(
            f"quantized state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
            directory / STATE_NAME,
        )
    return quantized


def _int_keys(config: Any) -> None:
    """JSON turns modelopt's integer block-size keys (-1) into strings; turn them back."""
    if isinstance(config, dict):
        for key in list(config):
            if isinstance(key, str) and key.lstrip("-").isdigit():
                config[int(key)] = config.pop(key)
        for value in config.values():
            _int_keys(value)
    elif isinstance(config, list):
        for value in config:
            _int_keys(value)


def _prepare_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Create quantizer buffers (amax, pre-quant scale) that exist only after calibration, so load_state_dict fills them."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer):
            continue
        for attr in ("_amax", "_pre_quant_scale"):
            key = f"{name}.{attr}"
            if key in state and not hasattr(module, attr):
                module.register_buffer(attr, torch.empty_like(state[key]))
            elif key in state and getattr(module, attr).shape != state[key].shape:
                setattr(module, attr, torch.empty_like(state[key]))


def quantized_modules(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """Names of Linear/Conv modules whose weight, and whose input, quantizers are enabled."""
    weights, inputs = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if wq is not None and wq.is_enabled:
            weights.add(name)
        if iq is not None and iq.is_enabled:
            inputs.add(name)
    return weights, inputs
