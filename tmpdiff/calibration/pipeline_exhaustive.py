"""Every schedule over a few levels run through a text-to-image pipeline and judged per sample: the exhaustive
optimum that `tmpdiff bench --pipeline` compares TMPDiff with (where L^T is at most 6,561).

Each schedule is a real call of the stock pipeline with the engines attached, so the scheduler, guidance and VAE are
the pipeline's own. Schedules run in product order with a `CallMemo` on the denoiser: a call that repeats the previous
schedule's call at the same step exactly (shared prefix) reuses its output, so the engines run each node of the
schedule tree once per pipeline call (L + L^2 + ... + L^T calls, not T * L^T), as the class-conditional walk does.
The rows of the `SampleTable` are schedules, its columns the samples of every (prompts, seed) call; a sample's
`label` is its prompt's index across the groups (calibration prompts first), so any subset is a lookup.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from tmpdiff.calibration.exhaustive import SampleTable, tree_steps
from tmpdiff.calibration.pipeline_session import PipelineEvaluator, PipelineSession
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.runtime.call_memo import CallMemo

PromptGroup = tuple[Sequence[str], Sequence[int]]  # prompts, seeds (one pipeline call per seed)


def build_pipeline_table(session: PipelineSession, groups: Sequence[PromptGroup], levels: Sequence[str],
                         progress: bool = True) -> SampleTable:
    """Judge every schedule over `levels` (the reference first) on every group's prompts x seeds: latent error,
    1 - SSIM and PSNR (RGB, capped) of each sample against the all-reference sample of the same prompt and seed."""
    ev: PipelineEvaluator = session.evaluator  # type: ignore[assignment]
    levels = list(levels)
    if not levels or levels[0] != ev.reference:
        raise TmpdiffError(f"an exhaustive walk lists the reference {ev.reference} first, got levels {levels}")
    schedules = list(itertools.product(levels, repeat=ev.steps))
    calls = sum(len(seeds) for _, seeds in groups)
    table = SampleTable(ev.steps, levels, [], [])
    columns: dict[str, list[np.ndarray]] = {"latent": [], "one_minus_ssim": [], "psnr": []}
    fallbacks: list[np.ndarray] = []  # per seed's call: (schedules, prompts) denoiser calls that fell back
    memo = CallMemo()
    bar = tqdm(total=len(schedules) * calls, desc=f"exhaustive T={ev.steps}", unit="schedule", mininterval=5,
               disable=not progress)
    offset = 0
    try:
        ev.denoiser.call_memo = memo
        for prompts, seeds in groups:
            for seed in seeds:
                call = PipelineEvaluator(ev.pipe, ev.denoiser, list(prompts), [seed], ev.steps, ev.guidance_scale,
                                         ev.reference, timesteps=ev.timesteps)
                cols = {name: np.empty((len(schedules), len(prompts))) for name in columns}
                fell = np.zeros((len(schedules), len(prompts)), dtype=np.int16)
                for row, schedule in enumerate(schedules):
                    judged, _ = call.sample_errors(call.latents(schedule))
                    fell[row] = call.last_fallbacks  # the prompts ran as one batch: they fell back together
                    for name, values in judged.items():
                        cols[name][row] = values
                    bar.update()
                for name, values in cols.items():
                    columns[name].append(values)
                fallbacks.append(fell)
                table.seeds += [seed] * len(prompts)
                table.labels += [offset + i for i in range(len(prompts))]
            offset += len(prompts)
    finally:
        ev.denoiser.call_memo = None
        bar.close()
    table.metrics = {name: np.concatenate(parts, axis=1) for name, parts in columns.items()}
    table.fallbacks = np.concatenate(fallbacks, axis=1)
    table.step_evaluations = memo.misses
    expected = calls * tree_steps(len(levels), ev.steps)  # the reference run is the tree's first path
    if memo.misses != expected:  # e.g. a pipeline that calls its denoiser twice per step: still exact, only slower
        tqdm.write(f"note: {memo.misses} engine calls for {calls} pipeline calls' trees ({expected} if every shared "
                   "prefix were reused)")
    return table
