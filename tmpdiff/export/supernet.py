"""TMPQ-DM's super-network on tmpdiff's precisions: every quantizable layer holds one calibrated module per precision.

Built once from one modelopt-quantized copy of the model per precision (all calibrated on the same calibration set,
or restored from a build directory's saved quantizer state: the very quantizers the engines were exported from). The
fp32 model hosts them: each quantizable Linear/Conv is replaced by a `LayerSwitch` holding the fp32 module and the
quantized copies' modules for that layer (their quantizers, amax, SmoothQuant/AWQ scales and weights). Choosing a
layer's precision sets an index; nothing is recalibrated.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.export.quantize import (
    CONFIG_NAME,
    STATE_NAME,
    build_config,
    quantize,
    quantized_modules,
    restore_quantized,
)
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import load_manifest, recorded_model_hash, verify_files
from tmpdiff.formats.precisions import HIGH_PRECISION_PATTERNS, get_precision

BASE = "fp32"


class LayerSwitch(torch.nn.Module):
    """One layer at several precisions: `forward` runs the alternative named by `choice`."""

    def __init__(self, alternatives: Mapping[str, torch.nn.Module], choice: str = BASE) -> None:
        super().__init__()
        self.alternatives = torch.nn.ModuleDict(dict(alternatives))
        self.choice = choice

    def forward(self, *args, **kwargs):
        return self.alternatives[self.choice](*args, **kwargs)


@dataclass
class SuperNet:
    """The host model with its switches; `select` sets one precision per layer (in `layers` order)."""

    model: torch.nn.Module
    layers: list[str]
    precisions: list[str]
    switches: dict[str, LayerSwitch]

    def select(self, config: Sequence[str]) -> None:
        if len(config) != len(self.layers):
            raise TmpdiffError(f"a layer configuration of {len(config)} precisions for {len(self.layers)} layers")
        unknown = sorted(set(config) - set(self.precisions))
        if unknown:
            raise TmpdiffError(f"the super-network has no {', '.join(unknown)} (it holds {', '.join(self.precisions)})")
        for name, precision in zip(self.layers, config, strict=True):
            self.switches[name].choice = precision

    def uniform(self, precision: str) -> list[str]:
        return [precision] * len(self.layers)

    @property
    def config(self) -> list[str]:
        return [self.switches[name].choice for name in self.layers]


def quantizable_layers(quantized: Mapping[str, torch.nn.Module]) -> list[str]:
    """Linear/Conv modules quantized (weights or inputs) in at least one copy, in module order."""
    names: set[str] = set()
    for model in quantized.values():
        weights, inputs = quantized_modules(model)
        names |= weights | inputs
    order = {name: i for i, (name, _) in enumerate(next(iter(quantized.values())).named_modules())}
    return sorted(names, key=order.__getitem__)


def assemble(model: torch.nn.Module, quantized: Mapping[str, torch.nn.Module]) -> SuperNet:
    """The super-network from the fp32 `model` (copied) and one quantized copy per precision (modules shared)."""
    if not quantized:
        raise TmpdiffError("a super-network needs at least one quantized precision")
    layers = quantizable_layers(quantized)
    if not layers:
        raise TmpdiffError("no quantized layer in any precision: nothing to switch")
    host = copy.deepcopy(model).eval()
    switches = {}
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = host.get_submodule(parent_name) if parent_name else host
        alternatives = {BASE: getattr(parent, child)} | {p: m.get_submodule(name) for p, m in quantized.items()}
        switches[name] = LayerSwitch(alternatives)
        setattr(parent, child, switches[name])
    return SuperNet(host, layers, [BASE, *quantized], switches)


def calibrate_supernet(model: torch.nn.Module, precisions: Sequence[str], calibration: Sequence[dict], forward,
                       keep_high_precision: Sequence[str] = HIGH_PRECISION_PATTERNS) -> SuperNet:
    """Quantize one copy per precision with modelopt on the same `calibration` batches, then assemble."""
    quantized = {}
    for name in precisions:
        spec = get_precision(name)
        quantized[name] = quantize(model, build_config(spec, model, keep_high_precision), calibration, forward)
    return assemble(model, quantized)


def supernet_from_build(build_dir: Path, model_dir: Path, precisions: Sequence[str] | None = None) -> SuperNet:
    """The super-network from a build directory's saved quantizer state (what its engines were exported from)."""
    from tmpdiff.models.loading import load_diffusers_model

    manifest = load_manifest(build_dir)
    if manifest.model_sha256 != recorded_model_hash(model_dir, manifest.model_sha256):
        raise TmpdiffError(f"the build was exported from another model than {model_dir}: pass --model with the one it was "
                           f"exported from (bundled, bundled-t2i, or its pipeline or model directory; the build's model "
                           f"id is {manifest.model_id!r})", build_dir / "manifest.json")
    # default: every quantized export (16-bit exports are whole-model precisions, not per-layer choices); an empty
    # list is fp32 alone (a search of timesteps only), not the default
    quantized_exports = [p for p in manifest.precisions if get_precision(p).modelopt_cfg is not None]
    names = [p for p in (quantized_exports if precisions is None else precisions) if p != BASE]
    missing = [p for p in names if p not in manifest.precisions or get_precision(p).modelopt_cfg is None]
    if missing:
        raise TmpdiffError(f"no quantized export of {', '.join(missing)} in the build", build_dir / "manifest.json")
    for name in names:  # the quantizers restored are those the engines were exported from, or nothing runs
        verify_files(build_dir, name, manifest.precisions[name], [f"{name}/{file}" for file in (STATE_NAME, CONFIG_NAME)])
    # loaded as the engines' exports were (`export --load-dtype`): their quantizers were calibrated on that model
    dtypes = {manifest.precisions[name].reference_dtype for name in names}
    if len(dtypes) > 1:
        raise TmpdiffError(f"the build's {', '.join(names)} were exported from the model loaded in different dtypes "
                           f"({', '.join(sorted(dtypes))}): re-export them with one --load-dtype",
                           build_dir / "manifest.json")
    model = load_diffusers_model(model_dir, dtype=getattr(torch, dtypes.pop()) if dtypes else None).eval()
    quantized = {p: restore_quantized(model, build_dir / p) for p in names}
    return assemble(model, quantized)


def layer_macs(supernet: SuperNet, module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Multiply-accumulates per sample of each switchable layer, counted on one forward of `module` (which wraps the
    super-network's host) with `inputs` (their first dimension is the batch)."""
    counts: dict[str, int] = {}
    hooks = []
    batch = int(inputs[0].shape[0])

    def hook(name: str):
        def record(layer: torch.nn.Module, args, output: torch.Tensor) -> None:
            if isinstance(layer, torch.nn.Linear):
                macs = output.numel() * layer.in_features
            else:  # convolutions: every output element sums in_channels / groups x kernel taps
                macs = output.numel() * layer.weight[0].numel()
            counts[name] = macs // batch
        return record

    for name in supernet.layers:
        hooks.append(supernet.switches[name].alternatives[BASE].register_forward_hook(hook(name)))
    saved = supernet.config
    try:
        supernet.select(supernet.uniform(BASE))
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in hooks:
            handle.remove()
        supernet.select(saved)
    return counts
