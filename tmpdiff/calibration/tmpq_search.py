"""TMPQ-DM's evolutionary search over (timesteps, per-layer precision), as its released code runs it.

From the released code (github sihouzi21c/TMPQ-DM, `alg_on_*.py`, `EvolutionSearcher`, `groupwise_consistent` mode):
- timestep groups: boundaries `int((linspace(0, sqrt(0.8 * 1000), T) ** 2)[1:])`, groups [0, b1), [b1, b2), ...,
  [b_last, 1000) (repeated boundaries dropped: fewer than T groups; ours moves them apart instead, see
  `tmpq_groups`); a candidate takes one timestep per group;
- initial population (`use_ddim_init_x`): the candidate of every group's first timestep, half the population random,
  the rest mutations of that first candidate with gene probability 0.1;
- a generation: the top `select` (10) of everything seen so far are parents; `mutations` (25) mutants (each timestep
  gene redrawn within its group and each layer gene redrawn with probability `m_prob`, 0.25), `crossovers` (10)
  uniform crossovers (per timestep gene, per layer gene), then random candidates up to the population (50);
- a candidate seen before, or over the budget, is discarded (never evaluated, never a parent).
Ours: genes are tmpdiff precisions (not 5-8 bit widths); the budget is predicted engine time from a per-layer costs
table (BitOPs reported beside); per-step mode caps the distinct layer configurations (each becomes an engine), and
there a mutant mutates the parent's pool of distinct configurations and which step runs which (a new configuration
only while under the cap), and a crossover over the cap keeps the configurations most of its steps run and moves the
other steps to the nearest kept one, so every generated candidate keeps within the cap (one over it would be discarded
and counted apart from those over the budget); the random draws come from one seeded generator, and every loop that draws
until a legal candidate gives up after `max_tries` draws per wanted candidate (the released loops have no bound).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tmpdiff.calibration.knapsack import within_budget
from tmpdiff.formats.errors import TmpdiffError

Config = tuple[int, ...]  # one precision index per layer


def tmpq_groups(steps: int, train: int = 1000) -> list[range]:
    """TMPQ-DM's timestep groups for `steps` steps over `train` training timesteps (ascending; narrow at low noise):
    exactly `steps` groups. The released boundaries collide at low noise for many steps (int() of close squares), where
    its code drops the repeats and searches fewer steps (30, 50, 100 steps: 29, 49, 96 groups); here a repeated (or 0)
    boundary moves up to one past the one before, and the top ones down below `train` if that pushed them there."""
    if steps < 2:
        raise TmpdiffError(f"TMPQ-DM timestep groups need at least 2 steps, got {steps}")
    if steps > train:
        raise TmpdiffError(f"{steps} steps need {steps} timestep groups, but the scheduler has only {train} training "
                           "timesteps")
    bounds = [int(s) for s in list(np.linspace(0, np.sqrt(train * 0.8), steps) ** 2)[1:]]
    for i in range(len(bounds)):  # strictly increasing from 1 ...
        bounds[i] = max(bounds[i], bounds[i - 1] + 1 if i else 1)
    for i in reversed(range(len(bounds))):  # ... and below train (steps <= train leaves room for both)
        bounds[i] = min(bounds[i], bounds[i + 1] - 1 if i + 1 < len(bounds) else train - 1)
    edges = [0, *bounds, train]
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]


@dataclass(frozen=True)
class Candidate:
    """Timesteps (one per group, ascending as the groups are) and each step's layer configuration."""

    timesteps: tuple[int, ...]
    configs: tuple[Config, ...]  # one per step; all equal in consistent mode

    @property
    def distinct_configs(self) -> list[Config]:
        return list(dict.fromkeys(self.configs))

    def sampling_timesteps(self) -> list[int]:
        """The timesteps in sampling order (highest noise first)."""
        return sorted(self.timesteps, reverse=True)

    def sampling_configs(self) -> list[Config]:
        """Each step's configuration in sampling order."""
        order = sorted(range(len(self.timesteps)), key=lambda i: -self.timesteps[i])
        return [self.configs[i] for i in order]


@dataclass
class SearchSettings:
    population: int = 50
    select: int = 10
    mutations: int = 25
    crossovers: int = 10
    m_prob: float = 0.25
    init_m_prob: float = 0.1
    generations: int = 20
    consistent: bool = True  # one layer configuration for every step (TMPQ-DM's scripts); else per step
    max_configs: int = 1  # per-step mode: at most this many distinct layer configurations
    seed: int = 0
    max_tries: int = 200  # draws per wanted candidate before a loop gives up
    max_seconds: float | None = None  # stop after the generation that passes it


@dataclass
class SearchResult:
    best: Candidate
    fitness: float
    cost: float
    evaluations: int  # candidates evaluated (fitness computed)
    rejected: int  # candidates discarded unevaluated: over_budget + over_cap
    generations: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    top: list[tuple[Candidate, float, float]] = field(default_factory=list)  # (candidate, fitness, cost), best first
    over_budget: int = 0  # within the configuration cap, over the budget
    over_cap: int = 0  # per-step mode: more distinct layer configurations than the cap (budget not looked at)


class TmpqSearch:
    """The evolution; `fitness(candidate)` (lower is better) and `cost(candidate)` are given, `budget` bounds cost."""

    def __init__(self, groups: Sequence[range], layers: int, choices: int, fitness: Callable[[Candidate], float],
                 cost: Callable[[Candidate], float], budget: float, settings: SearchSettings,
                 init_config: Config | None = None,
                 on_generation: Callable[[dict], None] = lambda _: None) -> None:
        if settings.mutations + settings.crossovers > settings.population or settings.select < 1:
            raise TmpdiffError("mutations + crossovers must fit in the population, and at least one parent is kept")
        if not settings.consistent and settings.max_configs < 1:
            raise TmpdiffError("per-step mode needs a cap of at least one layer configuration")
        self.groups = [list(g) for g in groups]
        self.layers, self.choices = layers, choices
        self.fitness_fn, self.cost_fn, self.budget = fitness, cost, budget
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.init_config = init_config or tuple([0] * layers)
        self.on_generation = on_generation
        self.seen: dict[Candidate, dict] = {}
        self.evaluations = 0
        self.over_budget = 0
        self.over_cap = 0

    # --- legality and evaluation -------------------------------------------------------------------------------
    def legal(self, cand: Candidate) -> bool:
        """Evaluate a new candidate within budget and cap; False (discarded) if seen, over budget or over the cap."""
        if cand in self.seen:
            return False
        info = self.seen[cand] = {"cost": self.cost_fn(cand)}
        over_cap = not self.s.consistent and len(cand.distinct_configs) > self.s.max_configs
        if over_cap or not within_budget(info["cost"], self.budget):
            info["fitness"] = math.inf
            if over_cap:
                self.over_cap += 1
            else:
                self.over_budget += 1
            return False
        info["fitness"] = float(self.fitness_fn(cand))
        self.evaluations += 1
        return True

    @property
    def rejected(self) -> int:
        return self.over_budget + self.over_cap

    def fitness(self, cand: Candidate) -> float:
        return self.seen[cand]["fitness"]

    # --- generators ----------------------------------------------------------------------------------------------
    def _steps(self) -> int:
        return len(self.groups)

    def _random_config(self) -> Config:
        return tuple(self.rng.randrange(self.choices) for _ in range(self.layers))

    def random_candidate(self) -> Candidate:
        timesteps = tuple(self.rng.choice(g) for g in self.groups)
        if self.s.consistent:
            configs = (self._random_config(),) * self._steps()
        else:
            pool = [self._random_config() for _ in range(self.s.max_configs)]
            configs = tuple(self.rng.choice(pool) for _ in range(self._steps()))
        return Candidate(timesteps, configs)

    def initial_candidate(self) -> Candidate:
        return Candidate(tuple(g[0] for g in self.groups), (self.init_config,) * self._steps())

    def _mutate_config(self, config: Config, prob: float) -> Config:
        return tuple(self.rng.randrange(self.choices) if self.rng.random() < prob else gene for gene in config)

    def mutate(self, parent: Candidate, prob: float) -> Candidate:
        timesteps = tuple(self.rng.choice(self.groups[i]) if self.rng.random() < prob else t
                          for i, t in enumerate(parent.timesteps))
        if self.s.consistent:
            configs = (self._mutate_config(parent.configs[0], prob),) * self._steps()
        else:
            configs = self._mutate_per_step(parent.configs, prob)
        return Candidate(timesteps, configs)

    def _mutate_per_step(self, configs: Sequence[Config], prob: float) -> tuple[Config, ...]:
        """Per-step mode: mutate the pool of distinct configurations (each layer gene with `prob`) and the step ->
        configuration assignment (each step redrawn with `prob` among the pool's slots, a free slot under the cap
        taking a mutation of the step's configuration), so a mutant never has more configurations than the cap."""
        parent_pool = list(dict.fromkeys(configs))
        slots = [parent_pool.index(c) for c in configs]
        pool = [self._mutate_config(c, prob) for c in parent_pool]
        for i in range(len(slots)):
            if self.rng.random() < prob:
                slot = self.rng.randrange(min(len(pool) + 1, max(self.s.max_configs, len(pool))))
                if slot == len(pool):  # a new configuration, split off from the step's own
                    pool.append(self._mutate_config(pool[slots[i]], prob))
                slots[i] = slot
        return tuple(pool[s] for s in slots)

    def cross(self, a: Candidate, b: Candidate) -> Candidate:
        pick = [self.rng.random() < 0.5 for _ in a.timesteps]
        timesteps = tuple(x if p else y for p, x, y in zip(pick, a.timesteps, b.timesteps, strict=True))
        if self.s.consistent:
            config = tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a.configs[0], b.configs[0], strict=True))
            configs = (config,) * self._steps()
        else:  # per-step mode: a step's configuration travels with its timestep gene
            configs = self._within_cap(tuple(x if p else y for p, x, y in zip(pick, a.configs, b.configs, strict=True)))
        return Candidate(timesteps, configs)

    def _within_cap(self, configs: tuple[Config, ...]) -> tuple[Config, ...]:
        """Per-step mode: a crossover's steps may bring more distinct configurations than the cap (each parent brings
        up to the cap). Keep the `max_configs` that most steps run (ties: the earliest step's first) and give every
        other step the kept configuration nearest its own (fewest layers differing; ties: the more used)."""
        pool = list(dict.fromkeys(configs))
        if len(pool) <= self.s.max_configs:
            return configs
        uses = {c: configs.count(c) for c in pool}
        kept = sorted(pool, key=lambda c: -uses[c])[: self.s.max_configs]  # stable: earliest first among ties

        def nearest(config: Config) -> Config:
            return min(kept, key=lambda k: sum(x != y for x, y in zip(config, k, strict=True)))

        return tuple(c if c in kept else nearest(c) for c in configs)

    def _fill(self, wanted: int, draw: Callable[[], Candidate], into: list[Candidate]) -> None:
        tries = 0
        start = len(into)
        while len(into) - start < wanted and tries < wanted * self.s.max_tries:
            tries += 1
            cand = draw()
            if self.legal(cand):
                into.append(cand)

    def _next_generation(self, parents: list[Candidate]) -> list[Candidate]:
        """Mutants of the parents, their crossovers, then random candidates up to the population (all legal, new)."""
        population: list[Candidate] = []
        self._fill(self.s.mutations, lambda: self.mutate(self.rng.choice(parents), self.s.m_prob), population)
        self._fill(self.s.crossovers, lambda: self.cross(self.rng.choice(parents), self.rng.choice(parents)), population)
        self._fill(self.s.population - len(population), self.random_candidate, population)
        return population

    # --- the evolution -------------------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        started = time.perf_counter()
        population: list[Candidate] = []
        init = self.initial_candidate()
        if self.legal(init):
            population.append(init)
        self._fill(self.s.population // 2, self.random_candidate, population)
        self._fill(self.s.population - len(population), lambda: self.mutate(init, self.s.init_m_prob), population)
        top: list[Candidate] = []
        history = []
        generation = 0
        while True:
            top = sorted(dict.fromkeys([*top, *population]), key=self.fitness)[: max(self.s.select, 50)]
            if not top:
                raise TmpdiffError("no candidate within the budget: raise the budget (a lower speedup) or allow more "
                                   "precisions")
            record = {"generation": generation, "best_fitness": self.fitness(top[0]), "evaluations": self.evaluations,
                      "rejected": self.rejected, "over_budget": self.over_budget, "over_cap": self.over_cap,
                      "population": len(population),
                      "seconds": round(time.perf_counter() - started, 2)}
            history.append(record)
            self.on_generation(record)
            generation += 1
            out_of_time = self.s.max_seconds is not None and time.perf_counter() - started > self.s.max_seconds
            if generation >= self.s.generations or out_of_time:
                break
            population = self._next_generation(top[: self.s.select])
        best = top[0]
        return SearchResult(best, self.fitness(best), self.seen[best]["cost"], self.evaluations, self.rejected,
                            generation, time.perf_counter() - started, history,
                            [(c, self.fitness(c), self.seen[c]["cost"]) for c in top[: self.s.select]],
                            self.over_budget, self.over_cap)
