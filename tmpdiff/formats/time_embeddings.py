"""The learned time-conditioning file (format `tmpdiff.time_embeddings/1`): what a few-step sampler feeds the model.

A safetensors file holds the tensor(s); its metadata key `tmpdiff` holds this JSON record. Two kinds:
- `mteo`: tensor `embeddings` of shape (steps, slots, dim): per step, the vector each slot (a transformer block's
  adaLN, or the output layer) receives in place of the model's embedding of that step's timestep;
- `timestep-shift`: tensor `shifts` of shape (steps,): per step, a learned offset added to the timestep the model
  sees (the solver still steps at its own timesteps), a Time-tuner-style baseline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tmpdiff.formats.schedule import MAX_STEPS

FORMAT = "tmpdiff.time_embeddings/1"
METADATA_KEY = "tmpdiff"
Kind = Literal["mteo", "timestep-shift"]
TENSOR_NAME: dict[str, str] = {"mteo": "embeddings", "timestep-shift": "shifts"}


class LossRecord(BaseModel):
    """One distillation run: its loss, the loss before and after, and the held-out final-sample error."""

    model_config = ConfigDict(extra="forbid")
    loss: Literal["trajectory", "final"]
    initial: float = Field(allow_inf_nan=False)
    final: float = Field(allow_inf_nan=False)
    validation_mse: float = Field(allow_inf_nan=False)
    seconds: float = Field(ge=0, allow_inf_nan=False)  # wall time
    cpu_seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # this process's CPU time


class TimeEmbeddingsInfo(BaseModel):
    """What the tensors are for: the model, the solver and its N timesteps, the slots, and how they were trained."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.time_embeddings/1"] = FORMAT
    kind: Kind
    model: str  # the model directory's name
    # the model's content hash as a build's manifest records it (`model_content_hash`); None in files written before
    model_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    model_parameters: int = Field(ge=1)
    # dpmsolver++ (2M, the model's config) or ddim (trailing spacing), on the model's noise process
    solver: Literal["dpmsolver++", "ddim"]
    steps: int = Field(ge=1, le=MAX_STEPS)
    timesteps: list[int]
    slots: list[str]  # which module receives each row (empty for timestep-shift)
    dim: int = Field(ge=0)
    trained_parameters: int = Field(ge=1)
    guidance_scale: float = Field(allow_inf_nan=False)
    reference_steps: int = Field(ge=1)
    train_seed: int
    train_samples: int = Field(ge=1)
    validation_seed: int
    iterations: int = Field(ge=0)
    loss: Literal["trajectory", "final"]  # the run with the lower held-out error (its tensor, when `kept` is learned)
    # "initial": no run beat the model's own embeddings (zero shifts) on the held-out set, so the file holds those
    kept: Literal["learned", "initial"] = "learned"
    initial_validation_mse: float | None = Field(default=None, allow_inf_nan=False)  # the initial tensor's held-out error
    precisions: list[str] | None = None  # quantization-aware: the precision each step was trained at (None: fp32)
    runs: list[LossRecord] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TimeEmbeddingsInfo:
        if len(self.timesteps) != self.steps:
            raise ValueError(f"{len(self.timesteps)} timesteps for {self.steps} steps")
        if self.precisions is not None and len(self.precisions) != self.steps:
            raise ValueError(f"{len(self.precisions)} precisions for {self.steps} steps")
        if self.kind == "mteo" and (not self.slots or self.dim < 1):
            raise ValueError("mteo embeddings name their slots and dimension")
        return self

    @property
    def parameter_fraction(self) -> float:
        return self.trained_parameters / self.model_parameters

    def expected_shape(self) -> tuple[int, ...]:
        return (self.steps, len(self.slots), self.dim) if self.kind == "mteo" else (self.steps,)
