"""What the pipeline needs to know about a denoiser class: its ONNX inputs, outputs and sample inputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TEXT_MASK, TensorSpec


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a diffusers model was loaded in (float32, or 16 bits when fp32 would not fit)."""
    return next(model.parameters()).dtype


def computing_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` for an export wrapper computing in `dtype`: itself when loaded in that dtype (or when float32 is asked:
    the wrapper casts its inputs), else converted in place."""
    return model if dtype in (torch.float32, model_dtype(model)) else model.to(dtype)


class DenoiserAdapter(ABC):
    """Describes one diffusers denoiser class for export and running."""

    architecture: ClassVar[str]
    default_text_len: ClassVar[int] = 77  # text-conditioned models: the pipeline's usual token count

    def __init__(self, config: dict) -> None:
        self.config = config

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def out_channels(self) -> int:
        return int(self.config.get("out_channels") or self.channels)

    @property
    def sample_size(self) -> int:
        return int(self.config["sample_size"])

    @property
    def text_len(self) -> int:
        """Fixed text sequence length of the exported graph (config key `text_len` overrides the default)."""
        return int(self.config.get("text_len", self.default_text_len))

    def latent_sides(self) -> list:
        """The latent side(s) the graph takes, as configured (`size_problem` checks them)."""
        return [self.config.get("sample_size")]

    def side_multiple(self) -> int:
        """What a latent side must be a multiple of: the patch size of a patch-embedding transformer (1: anything)."""
        patch = self.config.get("patch_size")
        return patch if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 else 1

    def size_problem(self) -> tuple[str, str] | None:
        """(config key, what is wrong) for the first graph size (`sample_size`, `text_len`) no graph can take, or None:
        each must be a positive integer, a latent side a multiple of the patch size."""
        for side in self.latent_sides():
            if not _positive_int(side):
                return "sample_size", f"must be a positive integer, got {side!r}"
            multiple = self.side_multiple()
            if int(side) % multiple:
                return "sample_size", (f"{int(side)} is not a multiple of the patch size {multiple} "
                                       f"({self.architecture})")
        if "text_len" in self.config and not _positive_int(self.config["text_len"]):
            return "text_len", f"must be a positive integer, got {self.config['text_len']!r}"
        return None

    def unsupported(self) -> str | None:
        """Why a model of this config cannot be exported (it takes an input the graph would silently drop), or None;
        `export_model` refuses such a model before it writes anything."""
        return None

    @abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @abstractmethod
    def output_specs(self) -> list[TensorSpec]: ...

    def default_dims(self, batch: int = 1) -> dict[str, int]:
        """Sizes of the named axes for a typical call with `batch` latents (only the batch axis is dynamic)."""
        return {"batch": batch}

    @abstractmethod
    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A module whose forward takes the inputs positionally (spec order) and returns the outputs.

        With `dtype` float16 the model computes in half precision while graph inputs and outputs stay
        float32, so every precision's engine binds the same buffers.
        """

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx-style dynamic axes for every named dimension."""
        axes: dict[str, dict[int, str]] = {}
        for spec in [*self.input_specs(), *self.output_specs()]:
            named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if named:
                axes[spec.name] = named
        return axes

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs that fit the specs (floats ~ N(0,1); integer inputs via `integer_range`; a text
        attention mask keeps a random-length prefix of tokens, as a tokenizer's padding does)."""
        gen = torch.Generator().manual_seed(seed)
        out: dict[str, torch.Tensor] = {}
        for spec in self.input_specs():
            shape = spec.concrete(dims)
            if spec.name == TEXT_MASK:
                lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=gen)
                out[spec.name] = (torch.arange(shape[1])[None, :] < lengths).to(torch.float32)
            elif np.issubdtype(np.dtype(spec.dtype), np.integer):
                low, high = self.integer_range(spec.name)
                out[spec.name] = torch.randint(low, high, shape, generator=gen, dtype=torch.int64)
            else:
                low_high = self.float_range(spec.name)
                if low_high is None:
                    out[spec.name] = torch.randn(shape, generator=gen, dtype=torch.float32)
                else:
                    low, high = low_high
                    out[spec.name] = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float32)
        return out

    def integer_range(self, name: str) -> tuple[int, int]:
        """Half-open range of valid values of an integer input."""
        raise TmpdiffError(f"{type(self).__name__} has no integer input {name!r}")

    def float_range(self, name: str) -> tuple[float, float] | None:
        """Uniform range for a float input's sample values, or None for N(0, 1)."""
        return None


def _positive_int(value: object) -> bool:
    """A size a graph can take: an integer (a JSON 64.0 too) above 0; a boolean is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value > 0 and float(value).is_integer()
