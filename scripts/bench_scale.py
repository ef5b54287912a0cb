#!/usr/bin/env python
"""Real-size denoisers through the whole pipeline on this machine: export, ORT-CPU build, one profiled step.

Models are made here from the public `config.json` values of each family, with random weights (seed 0; nothing is
downloaded), saved with `save_pretrained` (safetensors). Per model and precision every stage runs as its own
`tmpdiff` process, so its peak RSS is that process's own (`os.wait4`); the script records wall time, peak RSS, the
files each stage wrote, and then profiles every built precision in one `tmpdiff profile` run (ORT-CPU, batch 1,
median of the repeats). Quantized precisions calibrate on random inputs (`--random-calibration`): the weights are
random too, so there is no real input distribution to capture. The JSON is written after every stage, so an
interrupted run keeps what it measured and a re-run skips what is done (`--redo` measures it again, recording the
commit each row was measured with).

    python scripts/bench_scale.py --models sd15-unet,pixart-sigma --out results/cpu-epyc-2core/scale.json

Graphs take 512-px latents (64 x 64; SD1.5's native size, the others' 512-px variants) so a CPU step stays in
seconds; parameter counts, and so export memory, are those of the full models.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _code_version import code_version
from tqdm import tqdm

from tmpdiff.export.memory_plan import parameter_count
from tmpdiff.formats.atomic import write_json
from tmpdiff.formats.precisions import get_precision

# Public config.json values (diffusers format) of each family's denoiser; `dtype` is how the weights are stored.
MODELS: dict[str, dict] = {
    "sd15-unet": {
        "source": "runwayml/stable-diffusion-v1-5 unet/config.json",
        "class": "UNet2DConditionModel", "dtype": "float32",
        "config": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
                   "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8},
    },
    "pixart-sigma": {
        "source": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS transformer/config.json",
        "class": "PixArtTransformer2DModel", "dtype": "float32",
        "config": {"sample_size": 64, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
                   "num_attention_heads": 16, "attention_head_dim": 72, "cross_attention_dim": 1152,
                   "caption_channels": 4096, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                   "norm_eps": 1e-6, "num_embeds_ada_norm": 1000, "activation_fn": "gelu-approximate",
                   "attention_bias": True, "interpolation_scale": 1, "use_additional_conditions": False},
    },
    "sd3-medium": {
        "source": "stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json",
        "class": "SD3Transformer2DModel", "dtype": "float16",
        "config": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
        "graph": ["--sample-size", "64"],
    },
    "sdxl-unet": {
        "source": "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
        "class": "UNet2DConditionModel", "dtype": "float16",
        "config": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                   "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                   "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
        "graph": ["--sample-size", "64", "--time-ids", "6"],
    },
}


def save_model(name: str, directory: Path) -> None:
    """Make `name` from its config with random weights (seed 0) and save it to `directory` (safetensors)."""
    import diffusers
    import torch

    spec = MODELS[name]
    torch.manual_seed(0)
    model = getattr(diffusers, spec["class"]).from_config(spec["config"])
    model = model.to(getattr(torch, spec["dtype"]))
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100GB")


def make_model(name: str, work: Path) -> tuple[Path, int, float | None]:
    """The model directory (made once), its parameter count and the seconds making it took (None: made by an earlier
    run, whose figure stands).

    The model is made in a child process: memory the allocator keeps after a multi-GB model is freed would otherwise
    stay in this process for the whole run, beside every stage it measures.
    """
    directory = work / "models" / name
    if (directory / "config.json").is_file():
        return directory, parameter_count(directory), None
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(save_model, name, directory).result()
    return directory, parameter_count(directory), time.perf_counter() - started


def run_stage(args: list[str], log: Path) -> dict:
    """One `tmpdiff` process: seconds, peak RSS (its own, from wait4), exit code; output appended to `log`."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ tmpdiff {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "tmpdiff.cli", *args], stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB: the peak is recorded in GiB (rows before this name was given were GiB too)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "exit_code": proc.returncode}


def files_of(build_dir: Path, precision: str, pattern: str) -> dict[str, int]:
    """Sizes (bytes) of a precision's files matching `pattern`."""
    return {p.name: p.stat().st_size for p in sorted((build_dir / precision).glob(pattern)) if p.is_file()}


def engines_present(build_dir: Path, precision: str, row: dict) -> bool:
    """Whether the engine files an earlier run recorded for `precision` are still in `build_dir` (the work dir may
    have been emptied since: the profile needs them)."""
    recorded = row.get("engine_files") or {}
    return bool(recorded) and all((build_dir / precision / name).is_file() for name in recorded)


def bench_model(name: str, precisions: list[str], work: Path, results: dict, out: Path, repeats: int,
                redo: bool = False, memory_check: bool = True, random_batches: int | None = None) -> None:
    model_dir, params, make_seconds = make_model(name, work)
    spec = MODELS[name]
    record = results["models"].setdefault(name, {})
    record.update({"source": spec["source"], "class": spec["class"], "weights_dtype": spec["dtype"],
                   "parameters": params, "graph_args": spec.get("graph", []), "precisions": record.get("precisions", {})})
    if make_seconds is not None:
        record["make_seconds"] = round(make_seconds, 1)
    build_root, log = work / "build", work / f"{name}.log"
    build_dir = build_root / name
    for precision in tqdm(precisions, desc=name):
        row = record["precisions"].setdefault(precision, {})
        if row.get("build", {}).get("exit_code") == 0 and engines_present(build_dir, precision, row) and not redo:
            continue  # measured by an earlier run of this script, and its engine is still there to profile
        row.clear()
        row["code"] = code_version()
        shutil.rmtree(build_dir / precision, ignore_errors=True)  # this script's scratch build: export it afresh
        calibrated = get_precision(precision).modelopt_cfg is not None
        row["export"] = run_stage(["export", str(model_dir), "--precisions", precision, "--out", str(build_root),
                                   "--model-id", name, *spec.get("graph", []),
                                   *(["--random-calibration", *([] if random_batches is None else
                                                                ["--random-batches", str(random_batches)])]
                                     if calibrated else []),
                                   # without the plan `auto` loads fp32: a 16-bit checkpoint is then loaded as it ships
                                   *([] if memory_check else ["--no-memory-check", "--load-dtype",
                                                              "float32" if precision == "fp32" else spec["dtype"]])], log)
        row["memory_check"] = memory_check
        if random_batches is not None and calibrated:
            row["calibration_batches"] = random_batches
        write_json(out, results)
        if row["export"]["exit_code"] != 0:
            continue
        row["graph_files"] = files_of(build_dir, precision, "model*.onnx*")
        row["build"] = run_stage(["build", str(build_dir), "--backend", "ort", "--precisions", precision], log)
        row["engine_files"] = files_of(build_dir, precision, "model.ort-*")
        write_json(out, results)
        if row["build"]["exit_code"] != 0:
            continue
    # one profile over every built precision: ratios measured in one run, alternating precisions per repeat
    built = [p for p in precisions if record["precisions"].get(p, {}).get("build", {}).get("exit_code") == 0]
    if not built:
        return
    costs = work / f"{name}-costs.json"
    profile = run_stage(["profile", str(build_dir), "--backend", "ort", "--precisions", ",".join(built),
                         "--batch", "1", "--warmup", "1", "--repeats", str(repeats), "--out", str(costs), "--force"], log)
    # each profiled row keeps its own run (and who shared it): a later run over other precisions leaves it standing
    measured = json.loads(costs.read_text())["precisions"] if profile["exit_code"] == 0 else {}
    for precision in built:
        row = record["precisions"][precision]
        row["profile"] = profile | {"same_run": built}
        row.pop("step_ms_batch1", None)
        if precision in measured:
            row["step_ms_batch1"] = measured[precision]["median_ms"]
    write_json(out, results)


def this_machine() -> dict:
    """CPU model, cores, memory and Python of this machine: figures from different CPUs never share a file."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument("--precisions", default="fp32,int8,fp8,int4")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tmpdiff-scale"), help="models, builds and logs")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write (updated after every stage)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per precision (median)")
    parser.add_argument("--redo", action="store_true", help="measure precisions an earlier run already measured again")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="export what the memory plan would refuse: measures the peak the plan is fitted from")
    parser.add_argument("--random-batches", type=int, default=None,
                        help="batches of random calibration inputs (tmpdiff's default 8): fewer for an int4 export "
                             "of a 16-bit model, whose AWQ search runs 12 forwards per batch in fp16 (slow on CPUs "
                             "without fp16 arithmetic); recorded in the row")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"models": {}}
    machine = this_machine()
    recorded = results.get("machine", {}).get("cpu")
    if recorded not in (None, machine["cpu"]):
        raise SystemExit(f"{args.out} holds measurements of another machine ({recorded}; this one: {machine['cpu']}): "
                         "write this machine's to another --out")
    results["machine"] = machine
    for name in names:
        bench_model(name, [p.strip() for p in args.precisions.split(",")], args.work, results, args.out, args.repeats, args.redo,
                    args.memory_check, args.random_batches)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
