"""The build directory's `manifest.json` (format `tmpdiff.manifest/1`), validated with pydantic."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tmpdiff.atomic import read_model_file, sha256_file, write_json
from tmpdiff.errors import TmpdiffError
from tmpdiff.models.adapter import TensorSpec

MANIFEST_NAME = "manifest.json"
FORMAT = "tmpdiff.manifest/1"


class TensorSpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str
    shape: list[int | str]

    @classmethod
    def of(cls, spec: TensorSpec) -> TensorSpecModel:
        return cls(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, tuple(self.shape))


class PrecisionEntry(BaseModel):
    """One exported precision: its ONNX graph (path relative to the build dir) and what made it."""

    model_config = ConfigDict(extra="forbid")
    onnx: str
    sha256: str
    trt_onnx: str | None = None
    trt_sha256: str | None = None
    opset: int
    key: str
    parity_error: float  # ORT graph vs the torch (fake-quant) model, relative L2, median of 3 random batches
    error_vs_fp32: float  # ORT graph vs the fp32 torch model
    torch_error_vs_fp32: float | None = None  # torch fake-quant model vs fp32
    ort_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    quantization: dict = Field(default_factory=dict)


class EngineEntry(BaseModel):
    """One built engine: what it was built from, by which backend version, for which device."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["ort", "trt"]
    precision: str
    path: str
    sha256: str
    source_sha256: str
    backend_version: str
    device: str
    compute_capability: str | None = None
    build_flags: dict = Field(default_factory=dict)


def engine_key(backend: str, device: str, precision: str) -> str:
    """Manifest key of an engine: one per backend, device and precision."""
    return f"{backend}:{device}:{precision}"


class SamplingInfo(BaseModel):
    """How to sample a class-conditional model from its build directory alone (scheduler, classes, guidance)."""

    # scheduler configs hold -inf (lambda_min_clipped): keep it as JSON's -Infinity instead of null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    scheduler_class: str
    scheduler_config: dict
    num_classes: int = Field(ge=1)
    null_class: int
    image_size: int = Field(ge=1)
    channels: int = Field(ge=1)
    default_steps: int = Field(ge=1)
    guidance_scale: float


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    format: Literal["tmpdiff.manifest/1"] = FORMAT
    model_id: str
    architecture: str
    model_sha256: str
    denoiser_config: dict
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    precisions: dict[str, PrecisionEntry] = Field(default_factory=dict)
    engines: dict[str, EngineEntry] = Field(default_factory=dict)
    sampling: SamplingInfo | None = None

    def built_precisions(self, backend: str, device: str) -> list[str]:
        """Exported precisions that have an engine for this backend and device, in export order."""
        return [p for p in self.precisions if engine_key(backend, device, p) in self.engines]


def model_content_hash(model_dir: Path) -> str:
    """sha256 over a diffusers model directory's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted([model_dir / "config.json", *model_dir.glob("*.safetensors")]):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_manifest(build_dir: str | Path) -> Manifest:
    """Read and validate `build_dir/manifest.json`; errors name the file and the problem."""
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        raise TmpdiffError("no manifest.json: not a tmpdiff build directory", Path(build_dir))
    return read_model_file(path, Manifest, "tmpdiff.manifest/1 manifest")

def save_manifest(build_dir: str | Path, manifest: Manifest) -> None:
    """Write the manifest atomically."""
    write_json(Path(build_dir) / MANIFEST_NAME, manifest.model_dump(mode="json"))


def artifact_problem(build_dir: Path, rel: str, digest: str) -> tuple[Path, str | None]:
    """Where an artifact recorded in the manifest lives, and what is wrong with it (None if nothing)."""
    root = build_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        return path, "path escapes the build directory"
    if not path.is_file():
        return path, "file is missing (interrupted export?)"
    if sha256_file(path) != digest:
        return path, "sha256 does not match the manifest"
    return path, None


def verify_artifact(build_dir: Path, precision: str, entry: PrecisionEntry) -> Path:
    """Path of a precision's ONNX graph after checking it exists inside the build dir and matches its hash."""
    path, problem = artifact_problem(build_dir, entry.onnx, entry.sha256)
    if problem is not None:
        raise TmpdiffError(f"{precision}: {problem}; re-run `tmpdiff export --precisions {precision}`", path)
    return path
