"""`calibration_report.md` with matplotlib plots: sensitivities, score-vs-measured fits, images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tmpdiff.calibration.validation import held_out_schedules, validate  # noqa: E402
from tmpdiff.eval.metrics import to_images  # noqa: E402
from tmpdiff.formats.atomic import atomic_path, write_bytes, write_json  # noqa: E402


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_sensitivities(sens, path: Path) -> None:
    """d_t(p) and u_t(p) per level, with the steps the adaptive sampler really evaluated marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, curves, title in [(axes[0], sens.down, "downcast one step from the reference: d_t(p)"),
                              (axes[1], sens.up, "upcast one step from the all-cheapest: u_t(p)")]:
        for level, curve in curves.items():
            steps = np.arange(len(curve.values))
            (line,) = ax.plot(steps, curve.values, label=level)
            ax.scatter(curve.sampled, curve.values[curve.sampled], color=line.get_color(), zorder=3, s=18)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step t (0 = first, noisiest)")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_fits(validation: dict, path: Path) -> None:
    rows = validation["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, score in zip(axes, ("s_down", "s_up"), strict=True):
        for group, marker in (("random", "o"), ("structured", "s")):
            chosen = [r for r in rows if r["group"] == group]
            ax.scatter([r[score] for r in chosen], [r["measured"] for r in chosen], marker=marker, s=18, label=group)
        fit = validation["fits"]["all"][score]
        ax.set_title(f"{score}: R2 {_fit_cell(fit['r2'], '.3f')}, Spearman {_fit_cell(fit['spearman'], '.3f')}",
                     fontsize=9)
        ax.set_xlabel(f"predicted ({score})")
        ax.set_ylabel("measured error")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def image_strip(rows: dict[str, np.ndarray], path: Path, count: int = 10) -> None:
    """One row of samples per schedule name."""
    fig, axes = plt.subplots(len(rows), count, figsize=(count * 0.8, len(rows) * 0.95), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", fontsize=8)
    save_figure(fig, path)


def write_calibration_report(session, result, out: Path) -> dict:
    """Validation of the additivity scores on held-out schedules, plots, images, and the markdown report."""
    out.mkdir(parents=True, exist_ok=True)
    problem = session.problem
    validation = validate(problem, result.sensitivities, held_out_schedules(problem))
    plot_sensitivities(result.sensitivities, out / "sensitivities.png")
    plot_fits(validation, out / "score_fit.png")
    cheapest = tuple([problem.cheapest] * problem.steps)
    strip = {"reference": session.evaluator.reference_images,
             "TMPDiff": to_images(session.evaluator.latents(result.schedule)),
             f"uniform {problem.cheapest}": to_images(session.evaluator.latents(cheapest))}
    image_strip(strip, out / "images.png", count=min(10, len(strip["reference"])))
    costs = session.costs
    write_json(out / "validation.json", validation | {"costs": costs.provenance()})
    f = result.file
    fits = validation["fits"]
    lines = [
        "# Calibration report", "",
        f"- schedule ({problem.steps} steps): `{' '.join(f.precisions)}`",
        f"- target: {f.target}",
        f"- costs ({costs.origin}): {costs.note()}; per-step {costs.unit} {problem.cost}",
        f"- predicted speedup {f.predicted.speedup:.3f}x; measured {problem.metric} error {f.measured.error:.4g}, "
        f"SSIM {f.measured.ssim:.4f}; search evaluations: {f.evaluations}",
        "", "## Does additivity hold? (held-out schedules)", "",
        "| group | score | R2 | Spearman | slope | intercept |", "|---|---|---|---|---|---|",
    ]
    for group, by_score in fits.items():
        for score, fit in by_score.items():
            lines.append(f"| {group} | {score} | {_fit_cell(fit['r2'], '.3f')} | {_fit_cell(fit['spearman'], '.3f')} | "
                         f"{_fit_cell(fit['slope'], '.3g')} | {_fit_cell(fit['intercept'], '.3g')} |")
    lines += ["", "![score fit](score_fit.png)", "", "## Sensitivities (dots: evaluated steps)", "",
              "![sensitivities](sensitivities.png)", "", "## Samples", "", "![images](images.png)", ""]
    write_bytes(out / "calibration_report.md", "\n".join(lines).encode())
    return validation


def _fit_cell(value: float | None, spec: str) -> str:
    """A fit figure, or "n/a" where there was nothing to fit (too few held-out schedules, e.g. at 2 steps)."""
    return "n/a" if value is None else format(value, spec)
