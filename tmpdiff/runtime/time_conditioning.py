"""What a run feeds the model's time conditioning at each step: a schedule's learned MTEO rows or timestep shifts,
or (on graphs with a `time_embeddings` input and a plain schedule) the model's own embedding of the step's timestep.

A `tmpdiff.schedule/3` file names a `tmpdiff.time_embeddings/1` file beside it. The rows are checked before any
engine is loaded: the file's steps against the schedule's, its slots and dimension against the build's graph input;
its solver against the schedule's scheduler; the run's scheduler class, timesteps and guidance scale against the
run's once the scheduler has set its timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.manifest import Manifest
from tmpdiff.formats.schedule import Schedule
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.time_embedding_input import INPUT_NAME
from tmpdiff.models.time_embeddings import load_time_embeddings


@dataclass(frozen=True)
class TimeConditioning:
    """Per-step time conditioning read from a schedule's time-embeddings file."""

    values: torch.Tensor  # mteo: (steps, slots, dim); timestep-shift: (steps,)
    info: TimeEmbeddingsInfo
    path: Path

    @property
    def embeddings(self) -> torch.Tensor | None:
        return self.values if self.info.kind == "mteo" else None

    @property
    def shifts(self) -> torch.Tensor | None:
        return self.values if self.info.kind == "timestep-shift" else None

    def check_solver(self, scheduler) -> None:
        """The run samples with the solver the rows were learned for (a diffusers scheduler, or a schedule's
        `SchedulerRef`): its class, and DPM-Solver's ++ algorithm. Timesteps alone cannot tell: at N = 1 DDIM
        ('trailing') and DPM-Solver++ both sample at [999]."""
        problem = solver_problem(self.info.solver, getattr(scheduler, "class_name", None) or type(scheduler).__name__,
                                 scheduler.config)
        if problem is not None:
            raise TmpdiffError(f"learned for {problem}", self.path)

    def check_timesteps(self, timesteps: list[int]) -> None:
        """The run samples at the timesteps the rows were learned for."""
        if timesteps != list(self.info.timesteps):
            raise TmpdiffError(f"learned for timesteps {self.info.timesteps}, the run samples at {timesteps} "
                               f"(another solver, step count or spacing)", self.path)

    def check_guidance(self, guidance_scale: float) -> None:
        """The run guides as strongly as the sampling the rows were learned from."""
        if guidance_scale != self.info.guidance_scale:
            raise TmpdiffError(f"learned at guidance scale {self.info.guidance_scale}, the run uses {guidance_scale}",
                               self.path)

    def check_guided_batch(self, guided: bool) -> None:
        """Rows learned with classifier-free guidance (any scale but 1) run on a batch that holds the unconditional
        copy: a pipeline called with guidance_scale <= 1 makes none (diffusers turns guidance off there)."""
        if self.info.guidance_scale != 1.0 and not guided:
            raise TmpdiffError(f"learned with classifier-free guidance at scale {self.info.guidance_scale}, the pipeline "
                               f"call runs without it (no unconditional copy in its denoiser batch: guidance_scale <= 1 "
                               f"turns guidance off): call it with guidance_scale={self.info.guidance_scale}", self.path)


# the diffusers scheduler each solver of `tmpdiff.time_embeddings/1` is (`calibration.few_step.make_scheduler`)
SOLVER_CLASSES: dict[str, str] = {"dpmsolver++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}


def solver_problem(solver: str, class_name: str, config) -> str | None:
    """What differs between `solver` and a scheduler (class and config), as "<solver> (<class>), <scheduler> ..."
    for a message; None when it is that solver."""
    want = SOLVER_CLASSES[solver]
    algorithm = dict(config or {}).get("algorithm_type")
    if class_name == want and not (solver == "dpmsolver++" and algorithm not in (None, "dpmsolver++")):
        return None
    theirs = class_name if class_name != want else f"{class_name} with algorithm_type {algorithm!r}"
    return f"{solver} ({want}), the scheduler is {theirs}"


def load_conditioning(schedule: Schedule, schedule_path: Path) -> TimeConditioning | None:
    """The time-embeddings file a /3 schedule names (None for earlier versions), confined to the schedule's
    directory with symlinks resolved, and its step count checked against the schedule's."""
    if schedule.time_embeddings is None:
        return None
    root = schedule_path.resolve().parent
    path = (root / schedule.time_embeddings).resolve()
    if not path.is_relative_to(root):
        raise TmpdiffError(f"time_embeddings {schedule.time_embeddings!r} resolves outside the schedule's directory",
                           schedule_path)
    values, info = load_time_embeddings(path)
    if info.steps != schedule.steps:
        raise TmpdiffError(f"{info.steps} steps of time embeddings for a schedule of {schedule.steps} steps", path)
    if schedule.timesteps is not None and list(schedule.timesteps) != list(info.timesteps):
        raise TmpdiffError(f"learned for timesteps {info.timesteps}, the schedule names {schedule.timesteps}", path)
    conditioning = TimeConditioning(values, info, path)
    if schedule.scheduler is not None:  # one it names none of is checked where the run's scheduler is chosen
        conditioning.check_solver(schedule.scheduler)
    return conditioning


def check_build(conditioning: TimeConditioning | None, manifest: Manifest, build_dir: Path) -> None:
    """MTEO rows need graphs with a `time_embeddings` input of the same slots and dimension; timestep shifts need
    graphs that take the timestep (the own table has rows at integer timesteps only, a shifted one falls between)."""
    if conditioning is None:
        return
    learned_on = conditioning.info.model_sha256
    if learned_on is not None and learned_on != manifest.model_sha256:
        raise TmpdiffError(f"learned on another model ({conditioning.info.model}, other weights or config) than the one "
                           f"{build_dir} was exported from: distill them on that model", conditioning.path)
    entry = manifest.time_embedding_input
    if conditioning.shifts is not None:
        if entry is not None:
            raise TmpdiffError(f"{conditioning.path.name} holds timestep shifts, but {build_dir} takes time embeddings "
                               "instead of the timestep: run it on a build exported without --time-embedding-input",
                               conditioning.path)
        return
    if entry is None:
        raise TmpdiffError(f"{conditioning.path.name} holds per-block time embeddings, but {build_dir} computes them "
                           f"from the timestep: export it with --time-embedding-input", conditioning.path)
    if list(conditioning.info.slots) != list(entry.slots) or conditioning.info.dim != entry.dim:
        raise TmpdiffError(f"embeddings for {len(conditioning.info.slots)} slots x {conditioning.info.dim}, the build's "
                           f"graphs take {len(entry.slots)} x {entry.dim} ({', '.join(entry.slots[:2])}, ...)",
                           conditioning.path)


def takes_time_embeddings(engine) -> bool:
    """Whether an engine's graph takes the `time_embeddings` input."""
    return any(spec.name == INPUT_NAME for spec in engine.input_specs)


def own_row(table: torch.Tensor, timestep: float, label: str) -> torch.Tensor:
    """The table's row for an integer training timestep (the graphs' own embedding of it)."""
    t = float(timestep)
    if not t.is_integer() or not 0 <= t < len(table):
        raise TmpdiffError(f"{label}: timestep {t:g} has no row in the build's time-embedding table (integer training "
                           f"timesteps 0..{len(table) - 1}); use a scheduler with integer timesteps")
    return table[int(t)]


def feed_time_conditioning(call: dict, index: int | None, conditioning: TimeConditioning | None,
                           own_table: torch.Tensor | None, label: str) -> None:
    """A pipeline's denoiser call (bound arguments) made ready for the graphs: step `index`'s learned timestep shift
    added; on graphs with a `time_embeddings` input (`own_table` given) the timestep replaced by the step's learned
    row, else by the table's row of the call's timestep (every row of a call is at the same step)."""
    shifts = None if conditioning is None else conditioning.shifts
    if shifts is not None and index is not None:
        call["timestep"] = call["timestep"] + float(shifts[index])
    if own_table is None:
        return
    timestep = call.pop("timestep", None)
    learned = None if conditioning is None else conditioning.embeddings
    if learned is not None and index is not None:
        call[INPUT_NAME] = learned[index]
        return
    if timestep is None:
        raise TmpdiffError(f"{label}: the call passes no timestep to look the time embeddings up by")
    first = torch.as_tensor(timestep).reshape(-1)[0]  # one host read per call: the table is indexed on the host
    call[INPUT_NAME] = own_row(own_table, float(first), label)
