"""DRiffusion inside a stock diffusers pipeline: the attached denoiser drafts ahead, the pipeline's loop refines.

The pipeline calls its denoiser once per step and then its own `scheduler.step`. At a round's anchor step k the
attached denoiser (`EngineDenoiser` with `drafts` set) runs the anchor's call as usual, then drafts the states of the
round's next steps with the same DDIM skip transition as `runtime.parallel`, from the pipeline's own latent x_k, and
runs the engine on each draft (with that step's precision and timestep, the same text inputs). When the pipeline
reaches those steps it gets the drafts' outputs, whatever latent it passes: its scheduler updates along the original
trajectory with the drafts' noise estimates, which is DRiffusion's refinement. The modes and round structure are
`runtime.parallel`'s (conservative 2/(n+1): anchor round, then n drafts from its fresh estimate; aggressive 1/n:
anchor + n - 1 drafts from the previous round's last estimate), so the rounds per sample are `expected_rounds`.

Ours, beyond the paper as we have it: `min_alpha` keeps the first steps sequential. A DDIM jump from step k to j
maps an error in the noise estimate through the ratio a_j / a_k of signal scales, and at the first steps of a cosine
schedule a_k is near 0 (0.0001 at t = 999 for the bundled pipeline); without x0 thresholding (latent pipelines have
none) and with an extrapolated classifier-free-guidance estimate, those drafts land far from the trajectory. Anchors
with a_k < `min_alpha` draft nothing (one round, one step). 0 (the default) is the paper's behaviour.

The skip transition needs the *guided* noise estimate: with classifier-free guidance (guidance scale > 1, the
pipeline's batch is [uncond; cond]) it is formed as the pipeline forms it, uncond + g (cond - uncond), and a
learned-variance output (twice the latent channels) keeps its first half. The N calls of a round run one after
another here (exactly the samples N workers would give); only the class-conditional runner has Ray workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.parallel import ParallelMode, check_parallel_scheduler, skip_transition, vp_scales


@dataclass
class DropInDrafts:
    """Round state of DRiffusion in a pipeline; `rounds` counts sequential rounds of denoiser calls."""

    workers: int
    mode: ParallelMode
    guidance_scale: float
    min_alpha: float = 0.0  # ours: anchors with a smaller signal scale draft nothing (their DDIM jump is ill-posed)
    cond_first: bool = False  # the guided batch is [cond; uncond] (DiTPipeline), not diffusers' usual [uncond; cond]
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> output computed on its draft
    previous: torch.Tensor | None = None  # aggressive: the guided estimate the current anchor was refined with
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise TmpdiffError(f"--parallel must be at least 1, got {self.workers}")
        self.mode = ParallelMode(self.mode)

    def reset(self) -> None:
        """A new pipeline call."""
        self.pending, self.previous, self.rounds = {}, None, 0

    def take(self, index: int) -> torch.Tensor | None:
        """The output drafted for step `index` in this round, if any."""
        return self.pending.pop(index, None)

    def guided(self, output: torch.Tensor, latent_channels: int) -> torch.Tensor:
        """The noise estimate the pipeline steps with, from the denoiser's raw output."""
        if self.guidance_scale > 1.0:
            uncond, cond = output.float().chunk(2)
            if self.cond_first:
                uncond, cond = cond, uncond
            output = uncond + self.guidance_scale * (cond - uncond)
        if output.shape[1] == 2 * latent_channels:  # learned variance: the pipeline keeps the first half
            output = output[:, :latent_channels]
        return output

    def draft_calls(self, index: int, feeds: dict[str, Any], hidden_name: str, scheduler,
                    output: torch.Tensor | None) -> list[tuple[dict[str, Any], int]]:
        """The round's draft calls anchored at step `index` (feeds and step of each), counting the round's rounds.

        Aggressive drafts jump with the previous round's last estimate, so they are known before the anchor's own
        call runs (`output` None: a pool can evaluate them beside it); conservative drafts need the anchor's fresh
        estimate (`output`, the anchor call's raw result)."""
        timesteps = scheduler.timesteps
        steps = len(timesteps)
        if index == 0 and self.workers > 1:
            check_parallel_scheduler(scheduler)
        hidden = feeds[hidden_name]
        anchor = hidden[: hidden.shape[0] // 2] if self.guidance_scale > 1.0 else hidden
        self.rounds += 1
        if float(vp_scales(scheduler, index)[0]) < self.min_alpha:
            drafts, source = 0, None
        elif self.mode is ParallelMode.aggressive or self.workers == 1:
            drafts = 0 if self.previous is None else min(self.workers - 1, steps - 1 - index)
            source = self.previous
        else:
            if output is None:
                raise TmpdiffError("conservative drafts need the anchor's own estimate first")
            drafts, source = min(self.workers, steps - 1 - index), self.guided(output, anchor.shape[1])
            self.rounds += 1 if drafts else 0
        calls = []
        for j in range(1, drafts + 1):
            state = skip_transition(scheduler, anchor.float(), source, index, index + j).to(hidden.dtype)
            draft_feeds = dict(feeds)
            draft_feeds[hidden_name] = torch.cat([state, state]) if self.guidance_scale > 1.0 else state
            draft_feeds["timestep"] = torch.full_like(torch.as_tensor(feeds["timestep"]), float(timesteps[index + j]))
            calls.append((draft_feeds, index + j))
        return calls

    def accept(self, calls: list[tuple[dict[str, Any], int]], outputs: list[torch.Tensor], output: torch.Tensor,
               latent_channels: int) -> None:
        """Keep the drafts' outputs for their steps; the round's last estimate seeds the next aggressive round."""
        last = self.guided(output, latent_channels)
        for (_, step), result in zip(calls, outputs, strict=True):
            self.pending[step] = result
            last = self.guided(result, latent_channels)
        self.previous = last

    def after_anchor(self, index: int, feeds: dict[str, Any], hidden_name: str, output: torch.Tensor, scheduler,
                     run: Callable[[dict[str, Any], int], torch.Tensor]) -> None:
        """Draft and run the rest of the round that step `index` anchors, one call after another (`run(feeds, step)`
        runs one call)."""
        calls = self.draft_calls(index, feeds, hidden_name, scheduler, output)
        self.accept(calls, [run(f, step) for f, step in calls], output, self.channels_of(feeds, hidden_name))

    def channels_of(self, feeds: dict[str, Any], hidden_name: str) -> int:
        return int(feeds[hidden_name].shape[1])
