#!/usr/bin/env python
"""MTEO on the bundled DiT: distill, then judge every method at N = 3, 4, 6, 8 steps against plain sampling.

Phases (run them in order; `train` and `eval` take --steps so two processes can split the Ns):
  train      per N: one training set (noise seed --train-seed, labels cycling over the classes) and a 50-step fp32
             reference; MTEO with the trajectory loss, MTEO with the final-sample loss, and the Time-tuner-style
             timestep shift (trajectory loss) -> OUT/embeddings/*.safetensors + OUT/train-N{N}.json
  reference  the 20-step fp32 DPM-Solver++ samples of the evaluation set (noise seed --eval-seed) -> OUT/reference.safetensors
  eval       per N: plain N steps, plain 2N steps, timestep shift, MTEO (both losses): classifier accuracy, confidence
             (mean log-prob of the asked class), Frechet distance to the 1,797 real digits in the classifier's feature
             space (projected on the real features' top 16 principal directions) with a jackknife 95% interval and
             a paired-bootstrap interval of its difference to plain 2N steps, SSIM to the 20-step reference, wall
             time -> OUT/eval-N{N}.json, OUT/samples-N{N}.safetensors
  rejudge    recompute the judged figures of the existing OUT/eval-N*.json and OUT/qa-*.json from the samples saved
             beside them (no sampling): refuses to write unless the point values (FD, accuracy, confidence, SSIM) come
             out as recorded, then replaces the FD interval and keeps the rest of each row; --dry-run only checks
  report     OUT/mteo.json + OUT/mteo.md from the above

  OMP_NUM_THREADS=1 python scripts/bench_mteo.py train --steps 3,8 --out results/cpu-epyc-2core/mteo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tmpdiff.calibration.few_step import FewStepSampler, make_scheduler
from tmpdiff.calibration.mteo import DistillConfig, embeddings_info
from tmpdiff.commands.distill import load_distiller
from tmpdiff.engines.device import cpu_name
from tmpdiff.eval.bootstrap import jackknife_ci
from tmpdiff.eval.classifier import DigitClassifier, classify
from tmpdiff.eval.metrics import image_metrics, to_images
from tmpdiff.eval.quality import frechet_distance
from tmpdiff.formats.atomic import atomic_path, write_json
from tmpdiff.formats.manifest import model_content_hash
from tmpdiff.formats.time_embeddings import TimeEmbeddingsInfo
from tmpdiff.models.bundled import load_model_info
from tmpdiff.models.time_embeddings import load_time_embeddings, save_time_embeddings
from tmpdiff.runtime.runner import initial_noise

FD_DIMS = 16
TRAINED = {"mteo-trajectory": ("mteo", "trajectory"), "mteo-final": ("mteo", "final"),
           "shift": ("timestep-shift", "trajectory")}
# how `fd_ci95` was formed, recorded in each eval/qa file (files without it predate 2026-12-07: percentile bootstrap)
FD_INTERVAL = "jackknife"
FD_INTERVAL_TEXT = {
    "jackknife": "95% jackknife interval (normal on the log of FD, delete-one standard error; the real set fixed), "
                 "as tmpdiff.eval.bootstrap.jackknife_ci(positive=True)",
    "percentile-bootstrap": "95% percentile bootstrap of the generated samples (the real set fixed): resampling with "
                            "replacement duplicates samples and biases FD upward, so the interval sits above the "
                            "estimate and often excludes it",
}



def train(args, steps: int) -> None:
    distiller, denoiser_dir = load_distiller("bundled")
    base = DistillConfig(solver=args.solver, steps=steps, iterations=args.iterations, batch=args.batch,
                         train_samples=args.train_samples, validation_samples=args.validation_samples,
                         reference_steps=args.reference_steps, train_seed=args.train_seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    data = distiller.data(base)
    data_seconds, data_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"N={steps}: training data + reference in {data_seconds:.0f} s", flush=True)
    rows = {}
    for method, (kind, loss) in TRAINED.items():
        if args.methods and method not in args.methods.split(","):
            continue
        cfg = DistillConfig(**{**base.__dict__, "kind": kind})
        result = distiller.distill(cfg, loss, data)  # type: ignore[arg-type]
        r = result.record
        print(f"N={steps} {method}: loss {r.initial:.4f} -> {r.final:.4f}, held-out sample MSE {r.validation_mse:.4f}, "
              f"{r.seconds:.0f} s", flush=True)
        info = embeddings_info(distiller, cfg, denoiser_dir.parent.name, result.tensor, loss,  # type: ignore[arg-type]
                               [r], model_content_hash(denoiser_dir))
        save_time_embeddings(args.out / "embeddings" / f"{method}{args.tag}-N{steps}.safetensors", result.tensor, info)
        rows[method + args.tag] = {**r.model_dump(), "trained_parameters": info.trained_parameters,
                        "parameter_fraction": info.parameter_fraction, "loss_curve": [round(v, 5) for v in result.losses]}
    write_json(args.out / f"train{args.tag}-N{steps}.json", {
        "steps": steps, "solver": args.solver, "timesteps": distiller.timesteps(args.solver, steps),
        "data_and_reference_seconds": round(data_seconds, 1), "data_and_reference_cpu_seconds": round(data_cpu, 1),
        "train_seed": args.train_seed,
        "validation_seed": base.validation_seed, "train_samples": args.train_samples,
        "validation_samples": args.validation_samples, "iterations": args.iterations, "batch": args.batch,
        "reference_steps": args.reference_steps, "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "methods": rows})


def _eval_set(args, num_classes: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(args.samples) % num_classes, initial_noise(args.samples, channels, size, args.eval_seed)


def _sample(distiller, solver: str, steps: int, labels, noise, models=None, **conditioning) -> tuple[torch.Tensor, float]:
    sampler = FewStepSampler(distiller.model if models is None else models, steps, distiller.guidance_scale,
                             distiller.conditioning, distiller.channels)
    start = time.perf_counter()
    with torch.no_grad():
        out = sampler.sample_states(make_scheduler(solver, distiller.scheduler_config), labels, noise, **conditioning)[-1]
    return out, time.perf_counter() - start


def _save_samples(path: Path, outputs: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(tmp))


def reference(args) -> None:
    from safetensors.torch import save_file

    distiller, _ = load_distiller("bundled")
    labels, noise = _eval_set(args, distiller.conditioning.count, distiller.channels, distiller.image_size)
    samples, seconds = _sample(distiller, "dpmsolver++", 20, labels, noise)
    with atomic_path(args.out / "reference.safetensors") as tmp:
        save_file({"samples": samples.contiguous()}, str(tmp), metadata={"seconds": f"{seconds:.2f}",
                                                                         "eval_seed": str(args.eval_seed)})
    print(f"20-step fp32 reference of {args.samples} samples in {seconds:.1f} s", flush=True)


class Judge:
    """Classifier accuracy and confidence, FD with a jackknife interval, SSIM to the reference."""

    def __init__(self, args, labels: torch.Tensor, reference: torch.Tensor) -> None:
        from tmpdiff.models.digits import load_digits_tensors

        self.classifier = DigitClassifier.load(load_model_info().classifier_dir)
        real = classify(self.classifier, load_digits_tensors()[0])[1].numpy().astype(np.float64)
        # FD in the top FD_DIMS principal directions of the real digits' features: with a few hundred samples a
        # 128-dimensional covariance is mostly estimation noise, and its interval would be mostly bias
        self.mean = real.mean(0)
        self.basis = np.linalg.svd(real - self.mean, full_matrices=False)[2][:FD_DIMS].T
        self.real = self.project(real)
        self.labels, self.reference = labels, to_images(reference)
        self.bootstrap, self.seed = args.bootstrap, args.eval_seed

    def draws(self, n: int) -> np.ndarray:
        """The bootstrap's index draws (the same for every method: paired)."""
        return np.random.default_rng(self.seed).integers(0, n, (self.bootstrap, n))

    def features(self, samples: torch.Tensor) -> np.ndarray:
        return self.project(classify(self.classifier, samples)[1].numpy())

    def fd_difference(self, samples: torch.Tensor, baseline: torch.Tensor) -> dict:
        """FD(samples) - FD(baseline) with a paired bootstrap 95% interval (same noises resampled for both): the
        small-sample bias of FD, which puts a plain percentile interval above the point estimate, mostly cancels."""
        a, b = self.features(samples), self.features(baseline)
        diffs = [frechet_distance(a[i], self.real) - frechet_distance(b[i], self.real) for i in self.draws(len(a))]
        point = frechet_distance(a, self.real) - frechet_distance(b, self.real)
        return {"delta": point, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}

    def project(self, feats: np.ndarray) -> np.ndarray:
        return (feats.astype(np.float64) - self.mean) @ self.basis

    def __call__(self, samples: torch.Tensor) -> dict:
        preds, feats = classify(self.classifier, samples)
        with torch.no_grad():
            logp = self.classifier.head(feats).log_softmax(dim=1)
        asked = logp.gather(1, self.labels[:, None])[:, 0].numpy()
        correct = (preds == self.labels).numpy()
        feats = self.project(feats.numpy())
        # not a percentile bootstrap: resampling with replacement duplicates samples and biases FD upward, so that
        # interval sat above the estimate (101.3 [115.5, 275.7]); the jackknife interval is on the log of FD
        fd = jackknife_ci(lambda i: frechet_distance(feats[i], self.real), len(feats), positive=True)
        ssim, _ = image_metrics(to_images(samples), self.reference)
        n = len(correct)
        acc_se = float(np.sqrt(correct.mean() * (1 - correct.mean()) / n))
        return {"accuracy": float(correct.mean()), "accuracy_se": acc_se, "confidence": float(asked.mean()),
                "fd": fd.value, "fd_ci95": [fd.low, fd.high], "ssim": ssim}


def evaluate(args, steps_list: list[int]) -> None:
    from tmpdiff.models.loading import load_safetensors

    distiller, _ = load_distiller("bundled")
    labels, noise = _eval_set(args, distiller.conditioning.count, distiller.channels, distiller.image_size)
    ref = load_safetensors(args.out / "reference.safetensors")["samples"][: args.samples]
    judge = Judge(args, labels, ref)
    for steps in steps_list:
        rows = []
        runs = [("plain", steps, {}), ("plain-2N", 2 * steps, {})]
        extra = {m: TRAINED[m.split("-i")[0]] for m in args.extra.split(",") if m}
        for method, (kind, _) in {**TRAINED, **extra}.items():
            tensor, info = load_time_embeddings(args.out / "embeddings" / f"{method}-N{steps}.safetensors")
            runs.append((method, steps, {"embeddings" if kind == "mteo" else "shifts": tensor}))
        outputs = {}
        for method, n, conditioning in runs:
            samples, seconds = _sample(distiller, args.solver, n, labels, noise, **conditioning)
            row = {"method": method, "N": steps, "model_calls": n, "seconds": round(seconds, 2), **judge(samples)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            outputs[method] = samples
        for row in rows:
            row["fd_vs_plain_2N"] = judge.fd_difference(outputs[row["method"]], outputs["plain-2N"])
        _save_samples(args.out / f"samples-N{steps}.safetensors", outputs)
        write_json(args.out / f"eval-N{steps}.json", {"steps": steps, "rows": rows, "fd_interval": FD_INTERVAL,
                                                       "load_average_1min": round(os.getloadavg()[0], 2)})


def quantization_aware(args, steps: int) -> None:
    """MTEO trained in fp32 then run quantized, against MTEO trained through the fake-quant steps, same schedule."""
    from tmpdiff.calibration.mteo import Distiller
    from tmpdiff.calibration.mteo_quant import differentiable_attention, fake_quant_models, step_models
    from tmpdiff.models.bundled import sampling_info
    from tmpdiff.models.loading import load_safetensors

    schedule = [p.strip() for p in args.schedule.split(",")]
    schedule = schedule * steps if len(schedule) == 1 else schedule
    distiller, _ = load_distiller("bundled")
    start = time.perf_counter()
    models = fake_quant_models(distiller.model, sampling_info(load_model_info()), schedule)
    quant_seconds = time.perf_counter() - start
    per_step = step_models(schedule, models)
    qa = Distiller(distiller.model, distiller.scheduler_config, distiller.guidance_scale, distiller.conditioning,
                   distiller.channels, distiller.image_size, step_models=per_step)
    fp32_tensor, fp32_info = load_time_embeddings(args.out / "embeddings" / f"mteo-{args.qa_loss}-N{steps}.safetensors")
    cfg = DistillConfig(solver=args.solver, steps=steps, iterations=args.iterations, batch=args.batch,
                        train_samples=args.train_samples, validation_samples=args.validation_samples,
                        reference_steps=args.reference_steps, train_seed=args.train_seed)
    start = time.perf_counter()
    data = qa.data(cfg)  # the fp32 reference: data() samples with the fp32 model
    data_seconds = time.perf_counter() - start
    with differentiable_attention():
        result = qa.distill(cfg, args.qa_loss, data)
    r = result.record
    tag = "-".join(dict.fromkeys(schedule)) if len(set(schedule)) == 1 else "-".join(schedule)
    info = TimeEmbeddingsInfo(**{**fp32_info.model_dump(), "runs": [r], "precisions": schedule,
                                 "iterations": args.iterations})
    save_time_embeddings(args.out / "embeddings" / f"qa-mteo-{tag}-N{steps}.safetensors", result.tensor, info)
    print(f"N={steps} QA-MTEO {schedule}: loss {r.initial:.4f} -> {r.final:.4f}, held-out {r.validation_mse:.4f}, "
          f"{r.seconds:.0f} s", flush=True)
    labels, noise = _eval_set(args, distiller.conditioning.count, distiller.channels, distiller.image_size)
    judge = Judge(args, labels, load_safetensors(args.out / "reference.safetensors")["samples"][: args.samples])
    rows, outputs = [], {}
    for method, models_used, conditioning in [
            ("plain fp32", None, {}), ("MTEO fp32", None, {"embeddings": fp32_tensor}),
            (f"plain {tag}", per_step, {}), (f"MTEO fp32-trained, run {tag}", per_step, {"embeddings": fp32_tensor}),
            (f"QA-MTEO {tag}", per_step, {"embeddings": result.tensor})]:
        samples, seconds = _sample(distiller, args.solver, steps, labels, noise, models_used, **conditioning)
        row = {"method": method, "N": steps, "model_calls": steps, "seconds": round(seconds, 2), **judge(samples)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        outputs[method] = samples
    for row in rows:
        row["fd_vs_mteo_fp32"] = judge.fd_difference(outputs[row["method"]], outputs["MTEO fp32"])
    _save_samples(args.out / f"samples-qa-{tag}-N{steps}.safetensors", outputs)
    write_json(args.out / f"qa-{tag}-N{steps}.json", {
        "steps": steps, "schedule": schedule, "loss": args.qa_loss, "quantize_seconds": round(quant_seconds, 1),
        "data_and_reference_seconds": round(data_seconds, 1), "training": r.model_dump(),
        "loss_curve": [round(v, 5) for v in result.losses], "rows": rows, "fd_interval": FD_INTERVAL})


POINT_KEYS = ("fd", "accuracy", "accuracy_se", "confidence", "ssim")


def _samples_path(out: Path, result_path: Path) -> Path:
    """Where `evaluate` / `quantization_aware` saved the samples judged in eval-N{N}.json / qa-{tag}-N{N}.json."""
    stem = result_path.stem
    return out / (f"samples-N{stem.split('-N')[1]}.safetensors" if stem.startswith("eval-") else f"samples-{stem}.safetensors")


def rejudge(args) -> None:
    """Judge the saved samples of every eval/qa file again (no sampling) and replace each row's FD interval; the rest
    of each row is kept, the recorded point values included. Nothing is written unless every recomputed point value
    equals the recorded one (within --tolerance, 0 by default): the saved samples are those the rows judged."""
    import datetime

    from tmpdiff.models.loading import load_safetensors

    distiller, _ = load_distiller("bundled")
    labels, _ = _eval_set(args, distiller.conditioning.count, distiller.channels, distiller.image_size)
    judge = Judge(args, labels, load_safetensors(args.out / "reference.safetensors")["samples"][: args.samples])
    worst = dict.fromkeys(POINT_KEYS, 0.0)
    updated = {}
    for path in sorted(args.out.glob("eval-N*.json")) + sorted(args.out.glob("qa-*.json")):
        result = json.loads(path.read_text())
        samples_path = _samples_path(args.out, path)
        if not samples_path.exists():
            print(f"{path.name}: no {samples_path.name}, left as it is "
                  f"({result.get('fd_interval', 'percentile-bootstrap')} FD intervals)", flush=True)
            continue
        samples = load_safetensors(samples_path)
        file_worst = dict.fromkeys(POINT_KEYS, 0.0)
        for row in result["rows"]:
            if len(samples[row["method"]]) != args.samples:
                raise SystemExit(f"{samples_path.name}: {len(samples[row['method']])} samples of {row['method']!r}, "
                                 f"--samples is {args.samples}")
            new = judge(samples[row["method"]])
            for key in POINT_KEYS:
                file_worst[key] = max(file_worst[key], abs(new[key] - row[key]))
                worst[key] = max(worst[key], file_worst[key])
            print(f"{path.name} {row['method']}: FD {row['fd']:.1f} [{row['fd_ci95'][0]:.1f}, {row['fd_ci95'][1]:.1f}]"
                  f" -> {new['fd']:.1f} [{new['fd_ci95'][0]:.1f}, {new['fd_ci95'][1]:.1f}]", flush=True)
            row["fd_ci95"] = new["fd_ci95"]
        result["fd_interval"] = FD_INTERVAL
        result["fd_interval_rejudged"] = {"date": datetime.date.today().isoformat(), "from": samples_path.name,
                                          "max_point_difference": file_worst}
        updated[path] = result
    print("max |recomputed - recorded| of the point values: "
          + ", ".join(f"{key} {value:.3g}" for key, value in worst.items()), flush=True)
    if max(worst.values()) > args.tolerance:
        raise SystemExit(f"recomputed point values differ from the recorded ones by more than {args.tolerance:g}: "
                         "nothing written")
    if args.dry_run:
        return
    for path, result in updated.items():
        write_json(path, result)
        print(f"wrote {path}", flush=True)


def _fd_label(results) -> str:
    """The FD column's interval, from the files' `fd_interval` (absent: the percentile bootstrap of before)."""
    methods = {r.get("fd_interval", "percentile-bootstrap") for r in results}
    return f"95% {methods.pop()} CI" if len(methods) == 1 else "95% CI, " + " / ".join(sorted(methods))


def _fd_note(results) -> str:
    """What the FD intervals of these eval files are, and whether `rejudge` recomputed them."""
    methods = {r.get("fd_interval", "percentile-bootstrap") for r in results} | {FD_INTERVAL}  # + the reference row
    note = "FD intervals: " + "; ".join(FD_INTERVAL_TEXT[m] for m in sorted(methods)) + "."
    rejudged = [r["fd_interval_rejudged"] for r in results if "fd_interval_rejudged" in r]
    if rejudged:
        worst = max(v for r in rejudged for v in r["max_point_difference"].values())
        note += (f" Before {min(r['date'] for r in rejudged)} they were the {FD_INTERVAL_TEXT['percentile-bootstrap']}; "
                 "the evaluated rows' intervals were then recomputed from their saved samples (`bench_mteo.py rejudge`; "
                 f"the recorded point values reproduced, largest difference {worst:.1g}, and are kept).")
    return note


def _loads(results) -> str:
    """The recorded load averages of train/eval files, as a range; files from before they were recorded may carry the
    range their report stated at the time (`load_average_noted`), else it is unknown."""
    results = list(results)
    loads = [r["load_average_1min"] for r in results if "load_average_1min" in r]
    if loads:
        return f"{min(loads):g}-{max(loads):g}"
    noted = sorted({r["load_average_noted"] for r in results if "load_average_noted" in r})
    return f"{', '.join(noted)} (as stated when they ran, not recorded in the files)" if noted else "not recorded"


def report(args) -> None:
    from safetensors import safe_open

    with safe_open(str(args.out / "reference.safetensors"), framework="pt") as handle:
        ref_meta = handle.metadata()
    trains = {(int(p.stem.split("-N")[1]), p.stem): json.loads(p.read_text()) for p in sorted(args.out.glob("train*-N*.json"))}
    evals = {int(p.stem.split("-N")[1]): json.loads(p.read_text()) for p in sorted(args.out.glob("eval-N*.json"))}
    distiller, _ = load_distiller("bundled")
    labels, noise = _eval_set(args, distiller.conditioning.count, distiller.channels, distiller.image_size)
    from tmpdiff.models.loading import load_safetensors

    ref = load_safetensors(args.out / "reference.safetensors")["samples"][: args.samples]
    judge = Judge(args, labels, ref)
    ref_row = {"method": "reference (20 steps)", "N": 20, "model_calls": 20, "seconds": float(ref_meta["seconds"]),
               **judge(ref)}
    for steps, result in evals.items():  # paired FD difference to the model's own 20-step samples, same noises
        samples = load_safetensors(args.out / f"samples-N{steps}.safetensors")
        for row in result["rows"]:
            row["fd_vs_reference"] = judge.fd_difference(samples[row["method"]], ref)
    payload = {"format": "tmpdiff.bench_mteo/1", "machine": cpu_name(), "threads": 1, "solver": args.solver,
               "eval_samples": args.samples, "eval_seed": args.eval_seed, "bootstrap": args.bootstrap,
               "fd": f"classifier features on the real digits' top {FD_DIMS} principal directions; interval per file "
                     "(`fd_interval`; the reference row's is computed here): "
                     + "; ".join(f"{k}: {v}" for k, v in FD_INTERVAL_TEXT.items()),
               "reference": ref_row, "training": {stem: t for (_, stem), t in sorted(trains.items())}, "evaluation": evals}
    write_json(args.out / "mteo.json", payload)
    lines = [f"# MTEO on the bundled DiT ({args.solver}, {args.samples} evaluation samples, noise seed {args.eval_seed})",
             "", f"Machine: {cpu_name()}, 1 thread per process (OMP_NUM_THREADS=1). 1-minute load average when each "
             f"phase ended: evaluation {_loads(evals.values())}, training {_loads(trains.values())} (above 1, other "
             "jobs shared the cores and the times are inflated). Time: wall "
             "seconds to sample the whole evaluation set in one batch (the 20-step reference row: 200 samples). "
             "Accuracy and confidence saturate on "
             "this model; FD and SSIM separate the methods.", "",
             _fd_note(evals.values()) + " The paired FD differences are paired bootstraps "
             f"({args.bootstrap} resamples of the same noises), whose bias mostly cancels.", "",
             "| N | method | model calls | accuracy | confidence (log p) | "
             f"FD [{_fd_label([{'fd_interval': FD_INTERVAL}, *evals.values()])}] "
             "| FD - FD(plain 2N) [paired 95% CI] "
             "| SSIM to 20-step | time s | FD - FD(20-step) [paired 95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def line(r: dict) -> str:
        lo, hi = r["fd_ci95"]
        diff = r.get("fd_vs_plain_2N") or r.get("fd_vs_mteo_fp32")
        delta = "-" if diff is None else f"{diff['delta']:+.1f} [{diff['ci95'][0]:+.1f}, {diff['ci95'][1]:+.1f}]"
        ref_diff = r.get("fd_vs_reference")
        to_ref = "" if ref_diff is None else \
            f" {ref_diff['delta']:+.1f} [{ref_diff['ci95'][0]:+.1f}, {ref_diff['ci95'][1]:+.1f}] |"
        return (f"| {r['N']} | {r['method']} | {r['model_calls']} | {r['accuracy']:.1%} | {r['confidence']:.4f} | "
                f"{r['fd']:.1f} [{lo:.1f}, {hi:.1f}] | {delta} | {r['ssim']:.4f} | {r['seconds']:.1f} |{to_ref}")

    lines.append(line(ref_row))
    for steps in sorted(evals):
        lines += [line(r) for r in evals[steps]["rows"]]
    qas = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("qa-*.json"))}
    payload["quantization_aware"] = qas
    write_json(args.out / "mteo.json", payload)
    for stem, qa in qas.items():
        n = qa["steps"]
        t = qa["training"]
        stale = "" if qa.get("fd_interval") == FD_INTERVAL else (
            f" FD intervals: still the {FD_INTERVAL_TEXT[qa.get('fd_interval', 'percentile-bootstrap')]}; this "
            f"table's samples were not saved (no {_samples_path(args.out, Path(stem + '.json')).name}), so they could "
            "not be recomputed: read them as biased.")
        lines += ["", f"Quantization-aware MTEO, N = {n}, every step {' / '.join(qa['schedule'])} (modelopt fake quant), "
                      f"{qa['loss']} loss: loss {t['initial']:.4f} -> {t['final']:.4f}, held-out sample MSE "
                      f"{t['validation_mse']:.4f}, {t['seconds']:.0f} s wall. FD column: difference to MTEO fp32. "
                      f"Times: load 5-15.{stale}", "",
                  f"| N | method | model calls | accuracy | confidence (log p) | FD [{_fd_label([qa])}] "
                  "| FD - FD(MTEO fp32) [paired 95% CI] "
                  "| SSIM to 20-step | time s |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [line(r) for r in qa["rows"]]
    lines += ["", f"Training (noise seed {args.train_seed}, validation seed 2000):", "",
              "| N | method | trained params (fraction) | loss before -> after | held-out sample MSE | train s |",
              "|---|---|---|---|---|---|"]
    for (steps, _), t in sorted(trains.items()):
        for method, r in t["methods"].items():
            lines.append(f"| {steps} | {method} | {r['trained_parameters']:,} ({r['parameter_fraction']:.3%}) | "
                         f"{r['initial']:.4f} -> {r['final']:.4f} | {r['validation_mse']:.4f} | {r['seconds']:.0f} |")
        lines.append(f"| {steps} | (shared training data + reference) | | | | {t['data_and_reference_seconds']:.0f} |")
    with atomic_path(args.out / "mteo.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "reference", "eval", "qa", "rejudge", "report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="3,4,6,8")
    parser.add_argument("--solver", default="dpmsolver++", choices=["dpmsolver++", "ddim"])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=32)
    parser.add_argument("--validation-samples", type=int, default=16)
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--train-seed", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200, help="evaluation samples, spread over the classes")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--schedule", default="int8", help="qa: precision per step (one name: every step)")
    parser.add_argument("--qa-loss", default="trajectory", choices=["trajectory", "final"])
    parser.add_argument("--methods", default="", help="train: only these (comma-separated; default all)")
    parser.add_argument("--tag", default="", help="train: suffix of the files written, e.g. -i120")
    parser.add_argument("--extra", default="", help="eval: also these tagged embeddings, e.g. mteo-trajectory-i120")
    parser.add_argument("--dry-run", action="store_true", help="rejudge: check and print, write nothing")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="rejudge: largest difference of a recomputed point value to the recorded one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    steps_list = [int(s) for s in args.steps.split(",")]
    if args.phase == "train":
        for steps in steps_list:
            train(args, steps)
    elif args.phase == "reference":
        reference(args)
    elif args.phase == "eval":
        evaluate(args, steps_list)
    elif args.phase == "qa":
        for steps in steps_list:
            quantization_aware(args, steps)
    elif args.phase == "rejudge":
        rejudge(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
