"""Every schedule over a few levels, evaluated cheaply: a depth-first walk over the schedule tree.

Schedules that share their first d steps share the sampler state after step d (latent and the solver's
history), so the walk runs each prefix once: L levels and T steps cost L + L^2 + ... + L^T step evaluations
per sample batch instead of T * L^T (1,024 two-level schedules at T = 10: 2,046 steps, not 10,240). The
solver state is snapshotted per tree node (a shallow copy of the scheduler's attributes, lists copied: the
diffusers multistep solvers replace their history entries, never edit them in place). Each leaf's final
samples are judged per sample (`tmpdiff.eval.judge`), so a `SampleTable` holds every schedule's score on every
sample and any subset of samples (a calibration set, unseen seeds, a bootstrap draw) is a lookup.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tmpdiff.calibration.evaluator import Evaluation
from tmpdiff.calibration.knapsack import BUDGET_TOLERANCE
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.schedulers import sampling_scheduler, set_sampling_timesteps, step_generator
from tmpdiff.runtime.engine_use import exclusive
from tmpdiff.runtime.runner import ScheduledRunner, guided, initial_noise, run_guarded

Schedule = tuple[str, ...]
# Benches walk L^T schedules up to this many (2 levels: T <= 12; 3 levels: T <= 8); beyond, hours not minutes.
EXHAUSTIVE_MAX_SCHEDULES = 6561


_GENERATOR_STATE = "__tmpdiff_generator_state"  # a snapshot's key for the step-noise generator's state


def _snapshot(scheduler, generator: torch.Generator | None = None) -> dict:
    state = {k: list(v) if isinstance(v, list) else v for k, v in scheduler.__dict__.items()}
    if generator is not None:
        state[_GENERATOR_STATE] = generator.get_state()
    return state


def _restore(scheduler, snapshot: dict, generator: torch.Generator | None = None) -> None:
    scheduler.__dict__.clear()
    scheduler.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in snapshot.items()
                               if k != _GENERATOR_STATE})
    if generator is not None:
        generator.set_state(snapshot[_GENERATOR_STATE])


def _step(runner: ScheduledRunner, scheduler, latent: torch.Tensor, t, precision: str, index: int,
          generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
    """One denoising step exactly as `ScheduledRunner` runs it, and whether it fell back to a higher precision."""
    scaled = scheduler.scale_model_input(latent, t)
    runner.inputs["hidden_states"][: runner.batch].copy_(scaled)
    if runner.use_cfg:
        runner.inputs["hidden_states"][runner.batch :].copy_(scaled)
    runner.inputs["timestep"].fill_(float(t))
    _, fallback_from = run_guarded(runner.engines, precision, runner.outputs["noise_pred"], runner.stream,
                                   label=f"step {index}", nan_guard=runner.nan_guard)
    eps = runner.outputs["noise_pred"]
    if runner.use_cfg:
        eps = guided(eps, runner.guidance_scale)
    noise_kwargs = {} if generator is None else {"generator": generator}
    return scheduler.step(eps, t, latent, **noise_kwargs).prev_sample, fallback_from is not None


@torch.no_grad()
def walk_schedules(runner: ScheduledRunner, scheduler, labels: torch.Tensor, noise: torch.Tensor, levels: Sequence[str],
                   steps: int, on_leaf: Callable[[Schedule, torch.Tensor, int], None],
                   on_step: Callable[[], None] = lambda: None) -> int:
    """Call `on_leaf(schedule, final latents, steps that fell back)` for every schedule in levels^steps
    (itertools.product order); returns the number of step evaluations run. A step whose output is not finite is re-run
    one precision up (the runner's NaN guard), so a leaf below it scored the higher precision's quality there: the
    count says so."""
    runner._check_labels(labels)
    missing = sorted(set(levels) - set(runner.engines))
    if missing:
        raise TmpdiffError(f"no engine loaded for {', '.join(missing)}")
    set_sampling_timesteps(scheduler, steps, None)
    with exclusive(runner.engines.values(), "walk_schedules"):
        return _walk(runner, scheduler, labels, noise, levels, steps, on_leaf, on_step)


def _walk(runner: ScheduledRunner, scheduler, labels: torch.Tensor, noise: torch.Tensor, levels: Sequence[str],
          steps: int, on_leaf: Callable[[Schedule, torch.Tensor, int], None], on_step: Callable[[], None]) -> int:
    runner.claim()
    device = runner.inputs["hidden_states"].device
    labels = labels.to(device)
    runner.inputs["class_labels"].copy_(torch.cat([labels, torch.full_like(labels, runner.null_class)])
                                        if runner.use_cfg else labels)
    timesteps = list(scheduler.timesteps)
    count = 0
    # a stochastic step's noise: as `ScheduledRunner.sample` draws it (step_seed 0), its state restored with the
    # scheduler's at every node, so each leaf saw the draws its own run would
    generator = step_generator(scheduler, 0)

    def visit(depth: int, latent: torch.Tensor, state: dict, prefix: tuple[str, ...], fell: int) -> None:
        nonlocal count
        if depth == steps:
            on_leaf(prefix, latent, fell)
            return
        for level in levels:
            _restore(scheduler, state, generator)
            after, fell_back = _step(runner, scheduler, latent, timesteps[depth], level, depth, generator)
            count += 1
            on_step()
            visit(depth + 1, after, _snapshot(scheduler, generator), (*prefix, level), fell + fell_back)

    visit(0, noise.to(device) * scheduler.init_noise_sigma, _snapshot(scheduler, generator), (), 0)
    return count


def exhaustive_levels(problem_levels: Sequence[str], reference: str, asked: Sequence[str] | None, steps: int
                      ) -> list[str] | None:
    """The levels an exhaustive walk covers, the reference first: `asked`, or the reference and the cheapest level;
    None when their L^T schedules are more than a bench walks (`EXHAUSTIVE_MAX_SCHEDULES`). Levels outside the costs
    table, or a set without the reference, are refused."""
    levels = [reference, problem_levels[-1]] if not asked else list(dict.fromkeys(asked))
    unknown = [p for p in levels if p not in problem_levels]
    if unknown:
        raise TmpdiffError(f"--exhaustive-levels {', '.join(unknown)} not among the compared levels "
                           f"({', '.join(problem_levels)})")
    if reference not in levels or len(levels) < 2:
        raise TmpdiffError(f"--exhaustive-levels must hold the reference {reference} and at least one cheaper level, "
                           f"got {', '.join(levels)}")
    levels = [reference, *sorted((p for p in levels if p != reference), key=list(problem_levels).index)]
    return levels if too_many_to_walk(len(levels), steps) is None else None


def too_many_to_walk(levels: int, steps: int) -> str | None:
    """Why a walk of `levels` levels over `steps` steps is not made (None when it is): more schedules than a bench
    walks (`EXHAUSTIVE_MAX_SCHEDULES`)."""
    if levels ** steps <= EXHAUSTIVE_MAX_SCHEDULES:
        return None
    return (f"{levels}^{steps} = {levels ** steps:,} schedules at --steps {steps}, over the "
            f"{EXHAUSTIVE_MAX_SCHEDULES:,} a bench walks (three levels: T <= 8, two: T <= 12)")


def tree_steps(levels: int, steps: int) -> int:
    """Step evaluations of one walk: L + L^2 + ... + L^T."""
    return sum(levels ** d for d in range(1, steps + 1))


@dataclass
class SampleTable:
    """Per-sample metrics of every schedule over `levels` (rows: schedules in product order; columns: samples)."""

    steps: int
    levels: list[str]
    seeds: list[int]  # per sample
    labels: list[int]  # per sample
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (schedules, samples)
    features: np.ndarray | None = None  # (schedules, samples, d)
    step_evaluations: int = 0
    # (schedules, samples): steps of the sample's run that fell back to a higher precision (NaN/Inf output); None in
    # tables walked before it was recorded
    fallbacks: np.ndarray | None = None

    def fell_back(self) -> np.ndarray:
        """Per row (schedule): whether it fell back on any walked sample (all False where not recorded)."""
        if self.fallbacks is None:
            return np.zeros(len(self.levels) ** self.steps, dtype=bool)
        return self.fallbacks.any(axis=1)

    @property
    def schedules(self) -> list[Schedule]:
        return list(itertools.product(self.levels, repeat=self.steps))

    def row(self, schedule: Sequence[str]) -> int:
        index = 0
        for p in schedule:
            index = index * len(self.levels) + self.levels.index(p)
        return index

    def samples_of(self, seeds: Sequence[int], classes: Sequence[int] | None = None) -> np.ndarray:
        """Indices of the samples of these seeds (and, when given, only these classes)."""
        wanted = set(seeds)
        idx = np.array([i for i, (s, c) in enumerate(zip(self.seeds, self.labels, strict=True))
                        if s in wanted and (classes is None or c in classes)], dtype=np.int64)
        if len(idx) == 0:
            raise TmpdiffError(f"no samples of seeds {sorted(wanted)} in the table (seeds {sorted(set(self.seeds))})")
        return idx

    def values(self, metric: str, schedule: Sequence[str], samples: np.ndarray) -> np.ndarray:
        return self.metrics[metric][self.row(schedule), samples]

    def means(self, metric: str, samples: np.ndarray) -> np.ndarray:
        """Mean of a metric over the samples, per schedule."""
        return self.metrics[metric][:, samples].mean(axis=1)


def build_table(runner: ScheduledRunner, sampling, classes: Sequence[int], seed_groups: Sequence[Sequence[int]],
                levels: Sequence[str], reference: str, steps: int, classifier_dir: str | None,
                on_step: Callable[[], None] = lambda: None) -> SampleTable:
    """Walk every schedule once per seed group (a batch of classes x seeds the runner's size) and judge each leaf."""
    from tmpdiff.eval.judge import judge

    levels = list(levels)
    n_sched = len(levels) ** steps
    table = SampleTable(steps, levels, [], [])
    columns: list[dict[str, np.ndarray]] = []
    feature_cols: list[np.ndarray] = []
    fallback_cols: list[np.ndarray] = []
    for group in seed_groups:
        labels = torch.tensor([c for _ in group for c in classes], dtype=torch.int64)
        noise = torch.cat([initial_noise(len(classes), sampling.channels, sampling.image_size, s) for s in group])
        ref = runner.sample(sampling_scheduler(sampling), labels, noise, [reference] * steps).latents.clone()
        cols: dict[str, np.ndarray] = {}
        feats: np.ndarray | None = None
        fell = np.zeros((n_sched, len(labels)), dtype=np.int16)

        def on_leaf(schedule: Schedule, latents: torch.Tensor, fell_back: int, labels=labels, ref=ref, cols=cols,
                    fell=fell) -> None:
            nonlocal feats
            judged = judge(latents, ref, labels, classifier_dir)
            row = table.row(schedule)
            fell[row] = fell_back  # the batch ran together: every sample of it fell back with it
            f = judged.pop("features", None)
            for name, v in judged.items():
                cols.setdefault(name, np.empty((n_sched, len(labels))))[row] = v
            if f is not None:
                if feats is None:
                    feats = np.empty((n_sched, len(labels), f.shape[1]), dtype=np.float32)
                feats[row] = f

        table.step_evaluations += walk_schedules(runner, sampling_scheduler(sampling), labels, noise, levels, steps,
                                                 on_leaf, on_step)
        columns.append(cols)
        fallback_cols.append(fell)
        if feats is not None:
            feature_cols.append(feats)
        table.seeds += [s for s in group for _ in classes]
        table.labels += [c for _ in group for c in classes]
    table.metrics = {name: np.concatenate([c[name] for c in columns], axis=1) for name in columns[0]}
    table.fallbacks = np.concatenate(fallback_cols, axis=1)
    if feature_cols:
        table.features = np.concatenate(feature_cols, axis=1)
    return table


class TableEvaluator:
    """Problem.evaluate backed by a SampleTable on a subset of samples; counts the distinct schedules asked for."""

    def __init__(self, table: SampleTable, samples: np.ndarray) -> None:
        self.table = table
        self.samples = samples
        self.asked: set[Schedule] = set()

    def __call__(self, schedule: Sequence[str]) -> Evaluation:
        key = tuple(schedule)
        self.asked.add(key)
        t = self.table
        fell = 0 if t.fallbacks is None else int(t.fallbacks[t.row(key), self.samples].max())
        return Evaluation(key, float(t.values("latent", key, self.samples).mean()),
                          1.0 - float(t.values("one_minus_ssim", key, self.samples).mean()),
                          float(t.values("psnr", key, self.samples).mean()), fell)


def optimum(table: SampleTable, metric: str, samples: np.ndarray, cost: dict[str, float], budget: float
            ) -> tuple[Schedule, float]:
    """The schedule of least mean `metric` over `samples` among those costing at most `budget`."""
    schedules = table.schedules
    means = table.means(metric, samples)
    feasible = feasible_rows(table, cost, budget)
    best = int(feasible[np.argmin(means[feasible])])
    return schedules[best], float(means[best])


def feasible_rows(table: SampleTable, cost: dict[str, float], budget: float) -> np.ndarray:
    """The table's rows (schedules) costing at most `budget` (the knapsack's relative tolerance), without those that
    fell back to a higher precision on any walked sample: their scores are the higher precision's at a cheaper cost,
    and in deployment they would fall back too (at the higher precision's cost)."""
    costs = np.array([sum(cost[p] for p in s) for s in table.schedules])
    return np.flatnonzero((costs <= budget * (1 + BUDGET_TOLERANCE)) & ~table.fell_back())


def save_table(table: SampleTable, path, metrics_dtype: type | None = None) -> None:
    """The table as .npz (atomic), for re-reporting without re-running the walk; `metrics_dtype` (e.g. np.float32)
    halves a table kept in the repository."""
    import io

    from tmpdiff.formats.atomic import write_bytes

    buffer = io.BytesIO()
    arrays = {f"metric_{k}": v if metrics_dtype is None else v.astype(metrics_dtype) for k, v in table.metrics.items()}
    if table.features is not None:
        arrays["features"] = table.features
    if table.fallbacks is not None:
        arrays["fallbacks"] = table.fallbacks
    np.savez_compressed(buffer, steps=table.steps, levels=np.array(table.levels), seeds=np.array(table.seeds),
                        labels=np.array(table.labels), step_evaluations=table.step_evaluations, **arrays)
    write_bytes(path, buffer.getvalue())


def load_table(path) -> SampleTable:
    with np.load(path) as data:
        metrics = {k[len("metric_"):]: data[k] for k in data.files if k.startswith("metric_")}
        return SampleTable(int(data["steps"]), [str(x) for x in data["levels"]], [int(x) for x in data["seeds"]],
                           [int(x) for x in data["labels"]], metrics,
                           data["features"] if "features" in data.files else None, int(data["step_evaluations"]),
                           data["fallbacks"] if "fallbacks" in data.files else None)


def merge_tables(tables: Sequence[SampleTable]) -> SampleTable:
    """One table over the samples of several (same steps and levels), e.g. walks of different seed groups."""
    first = tables[0]
    for t in tables[1:]:
        if (t.steps, t.levels) != (first.steps, first.levels) or set(t.metrics) != set(first.metrics):
            raise TmpdiffError("tables to merge differ in steps, levels or metrics")
    features = None if any(t.features is None for t in tables) else np.concatenate([t.features for t in tables], axis=1)
    fallbacks = None  # recorded only if some table recorded it (the others' walks are taken as not falling back)
    if any(t.fallbacks is not None for t in tables):
        fallbacks = np.concatenate([t.fallbacks if t.fallbacks is not None else
                                    np.zeros((len(t.schedules), len(t.seeds)), dtype=np.int16) for t in tables], axis=1)
    return SampleTable(first.steps, list(first.levels), [s for t in tables for s in t.seeds],
                       [c for t in tables for c in t.labels],
                       {k: np.concatenate([t.metrics[k] for t in tables], axis=1) for k in first.metrics}, features,
                       sum(t.step_evaluations for t in tables), fallbacks)
