"""A TMPQ-DM plan (format `tmpdiff.tmpq-plan/2`; `/1` is still read): which training timesteps run, and each step's
per-layer precisions. `/2` adds the build it was searched on: the model's hash and each precision's export key (the
quantizers its layer configurations are made from), so a plan never runs or deploys on another build of the same id.

`configs` lists the distinct layer configurations (one precision per layer of `layers`); step i runs `configs[
step_configs[i]]` at `timesteps[i]` (sampling order, strictly decreasing). A configuration whose layers all share one
precision is that precision's engine; such a plan is also written as a `tmpdiff.schedule/2` file that `tmpdiff run`
executes (`uniform_schedule`). Mixed configurations need an engine of their own (not exported yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from tmpdiff.formats.atomic import read_model_file, write_json
from tmpdiff.formats.precisions import PRECISIONS
from tmpdiff.formats.schedule import MAX_STEPS, Schedule, SchedulerRef, timestep_problem

TMPQ_PLAN_FORMAT_V1 = "tmpdiff.tmpq-plan/1"
TMPQ_PLAN_FORMAT = "tmpdiff.tmpq-plan/2"


class TmpqPlan(BaseModel):
    """Timesteps and per-step layer configurations, with what the search predicted and measured for them."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["tmpdiff.tmpq-plan/1", "tmpdiff.tmpq-plan/2"] = TMPQ_PLAN_FORMAT
    model_id: str
    model_sha256: str | None = None  # /2: the model the search ran on (its weights and config)
    export_keys: dict[str, str] = Field(default_factory=dict)  # /2: precision -> export key of its quantizers
    steps: int = Field(ge=1, le=MAX_STEPS, strict=True)
    timesteps: list[StrictInt]
    scheduler: SchedulerRef | None = None
    layers: list[str] = Field(min_length=1)
    configs: list[list[str]]
    step_configs: list[StrictInt]
    reference: dict = Field(default_factory=dict)  # what the plan is compared with (fp32, its step count)
    predicted: dict = Field(default_factory=dict)  # from the per-layer costs table: ms, speedup, BitOPs
    measured: dict = Field(default_factory=dict)  # quality on the search's seeds and on held-out seeds
    search: dict = Field(default_factory=dict)  # settings, evaluations, rejected, seconds, history
    costs: dict = Field(default_factory=dict)  # which per-layer costs table, measured where
    # a build exported from a 16-bit model: the engine its unquantized ("fp32") layers run on (its super-network was
    # that 16-bit model), e.g. fp16; None: the fp32 engine
    unquantized_engine: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TmpqPlan:
        if self.format == TMPQ_PLAN_FORMAT_V1 and (self.model_sha256 is not None or self.export_keys):
            raise ValueError(f"model_sha256 and export_keys need format {TMPQ_PLAN_FORMAT}")
        if len(self.timesteps) != self.steps or len(self.step_configs) != self.steps:
            raise ValueError(f"{len(self.timesteps)} timesteps and {len(self.step_configs)} step configurations for "
                             f"{self.steps} steps")
        problem = timestep_problem(self.timesteps)
        if problem:
            raise ValueError(problem)
        for config in self.configs:
            if len(config) != len(self.layers):
                raise ValueError(f"a configuration of {len(config)} precisions for {len(self.layers)} layers")
            unknown = sorted(set(config) - set(PRECISIONS))
            if unknown:
                raise ValueError(f"unknown precision {', '.join(unknown)}")
        if self.unquantized_engine is not None and (self.unquantized_engine not in PRECISIONS or self.unquantized_engine
                                                    == "fp32" or PRECISIONS[self.unquantized_engine].modelopt_cfg):
            raise ValueError(f"unquantized_engine {self.unquantized_engine!r} is not an unquantized 16-bit precision")
        if any(not 0 <= i < len(self.configs) for i in self.step_configs):
            raise ValueError(f"a step names configuration outside 0..{len(self.configs) - 1}")
        return self

    def build_problem(self, manifest) -> str | None:
        """Why this plan cannot run or deploy on the build of `manifest` (None if it can): another model id, other
        weights, or a precision exported again since the search (its configurations would use other quantizers)."""
        if self.model_id != manifest.model_id:
            return f"the plan was searched on {self.model_id!r}, the build holds {manifest.model_id!r}"
        if self.model_sha256 is not None and self.model_sha256 != manifest.model_sha256:
            return (f"the plan was searched on another {self.model_id!r} (other weights or config than this build's): "
                    "search again on this build")
        used = {p for config in self.configs for p in config}
        changed = sorted(p for p, key in self.export_keys.items()
                         if p in used and p in manifest.precisions and manifest.precisions[p].key != key)
        if changed:
            return (f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} exported again since the search "
                    "(other quantizers than the plan was measured with): search again on this build")
        return None

    def step_precisions(self) -> list[list[str]]:
        return [self.configs[i] for i in self.step_configs]

    def uniform_engine(self, config: Sequence[str]) -> str | None:
        """The engine a configuration of one precision runs on (its precision's; unquantized: `unquantized_engine`
        or fp32); None for a mixed configuration (its deployed graph)."""
        if len(set(config)) != 1:
            return None
        return self.unquantized_engine if config[0] == "fp32" and self.unquantized_engine else config[0]

    def uniform_schedule(self) -> Schedule | None:
        """The plan as a v2 schedule when every configuration is one precision for all layers (else None)."""
        if any(len(set(c)) != 1 for c in self.configs):
            return None
        return Schedule(steps=self.steps, scheduler=self.scheduler,
                        precisions=[self.uniform_engine(c) for c in self.step_precisions()],
                        timesteps=list(self.timesteps), reference=str(self.reference.get("precision", "fp32")),
                        target=dict(self.predicted.get("target", {})),
                        predicted={"speedup": self.predicted.get("speedup")} if self.predicted.get("speedup") else {},
                        evaluations=int(self.search.get("evaluations", 0)))


def load_tmpq_plan(path: str | Path) -> TmpqPlan:
    return read_model_file(Path(path), TmpqPlan, "TMPQ-DM plan", missing="plan file")


def save_tmpq_plan(plan: TmpqPlan, path: str | Path) -> None:
    write_json(path, plan.model_dump(mode="json"))
