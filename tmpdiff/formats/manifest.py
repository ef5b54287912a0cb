"""The build directory's `manifest.json` (format `tmpdiff.manifest/1`-`/4`), validated with pydantic."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from tmpdiff.formats.atomic import read_json_object, read_model_file, sha256_file, write_json
from tmpdiff.formats.config_values import check_scheduler_counts, decode_non_finite, encode_non_finite
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec

MANIFEST_NAME = "manifest.json"
# per precision: a fixed input and the exported graph's output on it, which `tmpdiff check` replays on the engines
CHECK_IO_NAME = "check_io.safetensors"
CHECK_SEED = 99
FORMAT = "tmpdiff.manifest/2"  # /2 adds PrecisionEntry.artifacts and writes standard JSON; /1 still reads
FORMAT_V3 = "tmpdiff.manifest/3"  # /3 adds `time_embedding_input` and `mixed`; written only by builds that have them
FORMAT_V4 = "tmpdiff.manifest/4"  # /4 adds PrecisionEntry.reference_dtype; written only when one is not float32


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
    # the torch model the two errors above are measured against: fp32, or the 16 bits a model was loaded in to be
    # exported (too large for fp32 in memory, or a 16-bit checkpoint quantized as it ships: `export --load-dtype`)
    reference_dtype: Literal["float32", "float16"] = "float32"
    ort_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    quantization: dict = Field(default_factory=dict)
    # every other file a run or a rebuild depends on (external weight data, modelopt state and config): path -> sha256
    artifacts: dict[str, str] = Field(default_factory=dict)

    @field_validator("parity_error", "error_vs_fp32", "torch_error_vs_fp32")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number (a NaN or infinite figure would switch checks off)")
        return value

    def files(self) -> list[tuple[str, str]]:
        """(path, sha256) of every file of this precision: its graphs and their artifacts."""
        return [*self.graphs(), *self.artifacts.items()]

    def graphs(self) -> list[tuple[str, str]]:
        """(path, sha256) of each graph file: the ORT graph and, when it is another file, the TensorRT graph."""
        pairs = [(self.onnx, self.sha256)]
        if self.trt_onnx is not None and self.trt_onnx != self.onnx:
            pairs.append((self.trt_onnx, self.trt_sha256 or ""))
        return pairs

    def source_sha256(self, backend: str) -> str | None:
        """Hash of what a backend builds from (TensorRT: the trt:: graph; ORT: the standard-op twin): the graph file's,
        and with external data, of the graph and its `.data` together (a re-export can change the weights alone)."""
        graph, digest = (self.trt_onnx, self.trt_sha256) if backend == "trt" else (self.onnx, self.sha256)
        data = self.artifacts.get(f"{graph}.data")
        if digest is None or data is None:
            return digest
        return hashlib.sha256(f"{digest}:{data}".encode()).hexdigest()


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
    # other files the engine reads (an ORT graph's external `.data`), by path relative to the build dir -> sha256
    artifacts: dict[str, str] = Field(default_factory=dict)


def engine_key(backend: str, device: str, precision: str) -> str:
    """Manifest key of an engine: one per backend, device and precision."""
    return f"{backend}:{device}:{precision}"


class SamplingInfo(BaseModel):
    """How to sample a class-conditional model from its build directory alone (scheduler, classes, guidance)."""

    model_config = ConfigDict(extra="forbid")
    scheduler_class: str
    # scheduler configs hold -inf (lambda_min_clipped): standard JSON has no -Infinity, so non-finite numbers
    # are written as the strings "-inf", "inf", "nan" and read back as floats
    scheduler_config: dict
    num_classes: int = Field(ge=1, strict=True)  # strict: "10" is refused, as in schedules
    null_class: int = Field(strict=True)
    image_size: int = Field(ge=1, strict=True)
    channels: int = Field(ge=1, strict=True)
    default_steps: int = Field(ge=1, strict=True)
    guidance_scale: float = Field(allow_inf_nan=False, strict=True)

    @field_validator("scheduler_config", mode="before")
    @classmethod
    def _read_non_finite(cls, config: dict) -> dict:
        return check_scheduler_counts(decode_non_finite(config))

    @field_serializer("scheduler_config")
    def _write_non_finite(self, config: dict) -> dict:
        return encode_non_finite(config)


class TimeEmbeddingInputEntry(BaseModel):
    """Graphs exported with `--time-embedding-input`: their (slots, dim) input, and the model's own embedding at
    every integer training timestep (what a plain schedule feeds it), in a build-relative safetensors file."""

    model_config = ConfigDict(extra="forbid")
    input: str
    slots: list[str] = Field(min_length=1)
    dim: int = Field(ge=1)
    train_timesteps: int = Field(ge=1)
    own_table: str  # tensor `own`, float32 (train_timesteps, len(slots), dim)
    sha256: str


class MixedEntry(BaseModel):
    """One layer configuration of a TMPQ-DM plan as its own graphs (`tmpdiff deploy-plan`): a precision per layer,
    the ORT twin and the TensorRT graph made from the quantized exports' saved quantizer state (`sources`: precision
    -> export key, so a re-export makes it stale), and their parity against the super-network. Deployments made
    before TensorRT graphs existed have none (`trt_onnx` None: run on ORT, or deploy again)."""

    model_config = ConfigDict(extra="forbid")
    layers: list[str] = Field(min_length=1)
    precisions: list[str]
    onnx: str
    sha256: str
    ort_optimization: Literal["disable", "basic", "extended", "all"]
    parity_error: float = Field(ge=0, allow_inf_nan=False)
    sources: dict[str, str]
    trt_onnx: str | None = None
    trt_sha256: str | None = None
    trt_base: str | None = None  # the 16-bit type the TensorRT graph computes in outside its Q/DQ
    trt_parity_error: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # None: ORT cannot run it
    census: dict[str, int] = Field(default_factory=dict)

    def source_sha256(self, backend: str) -> str | None:
        """Hash of the graph a backend builds from (as `PrecisionEntry.source_sha256`)."""
        return self.trt_sha256 if backend == "trt" else self.sha256

    def files(self) -> list[tuple[str, str | None]]:
        """(relative path, sha256) of its graphs (as `PrecisionEntry.files`)."""
        return [(self.onnx, self.sha256)] + ([(self.trt_onnx, self.trt_sha256)] if self.trt_onnx is not None else [])

    @field_validator("precisions")
    @classmethod
    def _known(cls, precisions: list[str]) -> list[str]:
        from tmpdiff.formats.precisions import PRECISIONS

        unknown = sorted(set(precisions) - set(PRECISIONS))
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}")
        return precisions


MIXED_NAME = re.compile(r"mixed-[0-9a-f]{12}")


def mixed_name(layers: list[str], precisions: list[str]) -> str:
    """The engine name of a layer configuration: `mixed-` and 12 hex digits of its content."""
    digest = hashlib.sha256(json.dumps([layers, precisions]).encode()).hexdigest()
    return f"mixed-{digest[:12]}"


TMPQ_ON_PLAIN = "TMPQ-DM plans run on a build exported without --time-embedding-input"


STALE_EXPORT = "made from an older export of"  # a deployed configuration whose precisions were exported again


def mixed_problem(build_dir: Path, manifest: Manifest, name: str, backend: str | None = None) -> str | None:
    """Why a deployed layer configuration cannot run as it is (None when it can): on `backend` (ort: its twin; trt:
    its TensorRT graph, which older deployments lack), or every graph it records when None (what check asks)."""
    entry = manifest.mixed.get(name)
    if entry is None:
        return "not deployed"
    if manifest.time_embedding_input is not None:
        return f"deployed on a build whose graphs take time embeddings, not the timestep its graph takes: {TMPQ_ON_PLAIN}"
    if backend == "trt" and entry.trt_onnx is None:
        return "deployed without a TensorRT graph (by an older deploy-plan): deploy the plan again"
    files = [(entry.onnx, entry.sha256)] if backend != "trt" else []
    if backend != "ort" and entry.trt_onnx is not None:
        files.append((entry.trt_onnx, entry.trt_sha256))
    for rel, digest in files:
        path, problem = artifact_problem(build_dir, rel, digest)
        if problem is not None:
            return f"{path.name}: {problem}"
    stale = sorted(p for p, key in entry.sources.items() if p not in manifest.precisions
                   or manifest.precisions[p].key != key)
    if stale:
        return f"{STALE_EXPORT} {', '.join(stale)}"
    return None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.manifest/1", "tmpdiff.manifest/2", "tmpdiff.manifest/3", "tmpdiff.manifest/4"] = FORMAT
    model_id: str
    architecture: str
    model_sha256: str
    denoiser_config: dict
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    precisions: dict[str, PrecisionEntry] = Field(default_factory=dict)
    engines: dict[str, EngineEntry] = Field(default_factory=dict)
    sampling: SamplingInfo | None = None
    # largest intermediate tensor of the fp32 graph per batch row (ONNX shape inference): the memory guard's input
    activation_bytes_per_row: int | None = Field(default=None, ge=0)
    time_embedding_input: TimeEmbeddingInputEntry | None = None
    mixed: dict[str, MixedEntry] = Field(default_factory=dict)  # deployed TMPQ-DM layer configurations, by name

    @model_validator(mode="after")
    def _names_are_plain(self) -> Manifest:
        # a precision's name is the folder its engines are built into, so a name such as "../x" would put a build's
        # writes outside the build directory
        from tmpdiff.formats.precisions import PRECISIONS

        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"precisions holds {', '.join(map(repr, unknown))}: not a known precision "
                             f"({', '.join(PRECISIONS)})")
        odd = [n for n in self.mixed if not MIXED_NAME.fullmatch(n)]
        if odd:
            raise ValueError(f"mixed holds {', '.join(map(repr, odd))}: not the name of a layer configuration "
                             "(mixed- and 12 hex digits)")
        return self

    def require_sampling(self, build_dir: str | Path) -> SamplingInfo:
        """The sampling info class-conditional runs need; text-conditioned builds are told to use their pipeline."""
        if self.sampling is None:
            raise TmpdiffError("the build directory has no sampling info (exported from a model without tmpdiff_model.json); "
                               "run the model inside its pipeline: --pipeline DIR, with --prompt TEXT for run, --prompts "
                               "FILE for calibrate and bench (a class-label pipeline such as DiTPipeline: --class IDS, "
                               "--calib-classes IDS)",
                               Path(build_dir) / MANIFEST_NAME)
        labels = self.denoiser_config.get("num_embeds_ada_norm")  # a DiT's label table: the classes, then the null one
        if isinstance(labels, int) and max(self.sampling.num_classes, self.sampling.null_class) > labels:
            raise TmpdiffError(f"sampling names {self.sampling.num_classes} classes and null class "
                               f"{self.sampling.null_class}, the exported model's label table has {labels} classes and "
                               "the null one: not this model's sampling info", Path(build_dir) / MANIFEST_NAME)
        return self.sampling

    def built_precisions(self, backend: str, device: str) -> list[str]:
        """Exported precisions that have an engine for this backend and device, in export order."""
        return [p for p in self.precisions if engine_key(backend, device, p) in self.engines]


# Keys diffusers writes into a config.json about where and with which version it was saved: a re-saved model whose
# weights and other keys are the same is the same model.
SAVE_RECORD_KEYS = ("_name_or_path", "_diffusers_version", "_use_default_values", "transformers_version")


def model_content_hash(model_dir: Path) -> str:
    """sha256 over a diffusers model directory's config (its keys and values, without SAVE_RECORD_KEYS) and weight
    files (names and contents)."""
    return _content_hash(_config_sha256(model_dir), _weights_sha256(model_dir))


def folder_content_hash(folder: Path) -> str:
    """sha256 of a pipeline component folder: `model_content_hash` for a model (a config.json and weights), else
    over its files' names and contents (a tokenizer's few small files)."""
    if (folder / "config.json").is_file():
        return model_content_hash(folder)
    return _content_hash("", {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()})


def _config_sha256(model_dir: Path) -> str:
    config = read_json_object(model_dir / "config.json")
    kept = json.dumps({k: v for k, v in config.items() if k not in SAVE_RECORD_KEYS}, sort_keys=True)
    return hashlib.sha256(kept.encode()).hexdigest()


def _weights_sha256(model_dir: Path) -> dict[str, str]:
    """File name -> sha256 of each weight file (the expensive part: large files are read once per file identity,
    `weights_hash`)."""
    from tmpdiff.formats.weights_hash import weights_sha256

    return {path.name: weights_sha256(path) for path in model_dir.glob("*.safetensors")}


def _content_hash(config_sha256: str, weights: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name, sha in sorted({"config.json": config_sha256, **weights}.items()):
        digest.update(name.encode())
        digest.update(sha.encode())
    return digest.hexdigest()


def recorded_model_hash(model_dir: Path, recorded: str | None) -> str:
    """The model's content hash as a build records it: `recorded` when it is this model's (also when written before
    SAVE_RECORD_KEYS were left out, over config.json's bytes), else `model_content_hash`."""
    weights = _weights_sha256(model_dir)
    current = _content_hash(_config_sha256(model_dir), weights)
    if recorded is not None and recorded != current \
            and recorded == _content_hash(sha256_file(model_dir / "config.json"), weights):
        return recorded
    return current


def load_manifest(build_dir: str | Path) -> Manifest:
    """Read and validate `build_dir/manifest.json`; errors name the file and the problem."""
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        if os.path.lexists(path):  # a FIFO, device, folder or dangling link where the manifest should be
            raise TmpdiffError("not a regular file (a tmpdiff manifest is a JSON file)", path)
        if not Path(build_dir).exists():
            raise TmpdiffError("no such build directory", Path(build_dir))
        inside = sorted(str(p.parent) for p in Path(build_dir).glob(f"*/{MANIFEST_NAME}")) if Path(build_dir).is_dir() else []
        hint = f" (a build root? its builds: {', '.join(inside[:4])})" if inside else ""
        raise TmpdiffError(f"no manifest.json: not a tmpdiff build directory{hint}", Path(build_dir))
    return read_model_file(path, Manifest, "tmpdiff.manifest")


def save_manifest(build_dir: str | Path, manifest: Manifest) -> None:
    """Write the manifest atomically, in the lowest current version that holds it (/3 only with time embeddings or
    mixed configurations, /4 only with a 16-bit reference model)."""
    half_reference = any(e.reference_dtype != "float32" for e in manifest.precisions.values())
    version = FORMAT_V4 if half_reference else FORMAT if manifest.time_embedding_input is None and not manifest.mixed \
        else FORMAT_V3
    data = manifest.model_copy(update={"format": version}).model_dump(mode="json")
    if not half_reference:
        for entry in data["precisions"].values():
            entry.pop("reference_dtype")
    if manifest.time_embedding_input is None:
        data.pop("time_embedding_input")
    if not manifest.mixed:
        data.pop("mixed")
    write_json(Path(build_dir) / MANIFEST_NAME, data)


def artifact_problem(build_dir: Path, rel: str, digest: str) -> tuple[Path, str | None]:
    """Where an artifact recorded in the manifest lives, and what is wrong with it (None if nothing)."""
    root = build_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        return path, "path escapes the build directory"
    if path.is_dir():
        return path, "is a directory, not a file"
    if not path.is_file():
        return path, "file is missing (interrupted export?)"
    if sha256_file(path) != digest:
        return path, "sha256 does not match the manifest"
    return path, None


def precision_problems(build_dir: Path, entry: PrecisionEntry) -> list[tuple[Path, str]]:
    """Every file of an exported precision (graphs, external data, quantizer state) that is missing, corrupt or
    outside the build dir (symlinks resolved)."""
    found = [artifact_problem(build_dir, rel, digest) for rel, digest in entry.files()]
    return [(path, problem) for path, problem in found if problem is not None]


def engine_problem(build_dir: Path, manifest: Manifest, engine: EngineEntry, *, backend_version: str | None = None,
                   device: str | None = None) -> str | None:
    """Why a built engine cannot be used as it is (None when it is current): its file is outside the build dir,
    missing or corrupt; it was built from an older export; or (when given) by another backend version or for
    another device. The one freshness rule for build, load, run and check."""
    source = manifest.precisions.get(engine.precision) or manifest.mixed.get(engine.precision)
    if source is None:
        return f"engine for {engine.precision}, which is no longer exported (or deployed)"
    # the source graphs are not hashed here (check does that), but one outside the build dir is never current
    root = build_dir.resolve()
    outside = [rel for rel, _ in source.files() if not (root / rel).resolve().is_relative_to(root)]
    if outside:
        return f"its source {outside[0]}: path escapes the build directory"
    for rel, digest in [(engine.path, engine.sha256), *engine.artifacts.items()]:
        path, problem = artifact_problem(build_dir, rel, digest)
        if problem is not None:
            return f"engine file {path.name}: {problem}"
    if engine.source_sha256 != source.source_sha256(engine.backend):
        return "built from an older export"
    if backend_version is not None and engine.backend_version != backend_version:
        return f"built with {engine.backend} {engine.backend_version}, running {backend_version}"
    if device is not None and engine.device != device:
        return f"built for {engine.device!r}, this is {device!r}"
    return None


def verify_artifact(build_dir: Path, precision: str, entry: PrecisionEntry) -> Path:
    """Path of a precision's ONNX graph after checking it exists inside the build dir and matches its hash."""
    return verify_files(build_dir, precision, entry, [entry.onnx])[0]


def verify_files(build_dir: Path, precision: str, entry: PrecisionEntry, rels: Sequence[str]) -> list[Path]:
    """Paths of files of an exported precision (relative to the build dir) after checking each against the hash the
    manifest records for it: one missing, corrupt, outside the build dir or not recorded is a TmpdiffError."""
    recorded = dict(entry.files())
    paths = []
    for rel in rels:
        if rel not in recorded:  # (a /1 manifest records no artifacts)
            path, problem = build_dir / rel, "no sha256 for it in the manifest (an older export?)"
        else:
            path, problem = artifact_problem(build_dir, rel, recorded[rel])
        if problem is not None:
            raise TmpdiffError(f"{precision}: {problem}; re-run `tmpdiff export --precisions {precision}`", path)
        paths.append(path)
    return paths
