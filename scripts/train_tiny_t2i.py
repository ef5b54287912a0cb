#!/usr/bin/env python
"""Train the bundled tiny text-to-image pipeline (PixArt-Sigma layout) and its attribute classifier on coloured digits.

Deterministic for a seed on one machine. Run single-threaded on a shared machine:
  OMP_NUM_THREADS=1 python scripts/train_tiny_t2i.py --out DIR
Writes a diffusers pipeline directory (PixArtSigmaPipeline.from_pretrained(DIR) loads it, no tmpdiff code):
  OUT/model_index.json, tokenizer/, text_encoder/, vae/, transformer/, scheduler/   (safetensors weights)
  OUT/classifier/{config.json, model.safetensors}     attribute classifier (digit, digit colour, background colour)
  OUT/tmpdiff_t2i.json                                 training record and measured figures
Stages: classifier, VAE, latents, text encoder + transformer (trained together), evaluation of the saved pipeline.
Every model sees only the held-in combinations (tmpdiff.models.colored_digits.held_in_combos).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tmpdiff.eval.attributes import AttributeClassifier
from tmpdiff.eval.t2i import attribute_fd, generate, judge
from tmpdiff.formats.atomic import replace_directory, write_json
from tmpdiff.models.colored_digits import (
    COLOURS,
    Combo,
    attributes,
    digit_masks,
    digit_split,
    held_in_combos,
    held_out_combos,
    render,
    render_combos,
)
from tmpdiff.models.tiny_t2i import (
    CLASSIFIER_SUBFOLDER,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    RECORD_NAME,
    T5_CONFIG,
    TEXT_LEN,
    TRAIN_SCHEDULER_CONFIG,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
    build_components,
    t2i_dir,
)


class ComboSampler:
    """Random (image, combo) pairs: a held-in combo uniformly, then one of its digit's images from `pool`."""

    def __init__(self, combos: list[Combo], pool: torch.Tensor, seed: int) -> None:
        self.masks, labels = digit_masks()
        self.combos = combos
        self.attrs = attributes(combos)
        by_digit = [pool[labels[pool] == d] for d in range(10)]
        self.counts = torch.tensor([len(b) for b in by_digit])
        self.table = torch.stack([F.pad(b, (0, int(self.counts.max()) - len(b))) for b in by_digit])
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (n, 3, 32, 32) in [-1, 1] and their combo indices (n,)."""
        which = torch.randint(0, len(self.combos), (n,), generator=self.gen)
        digit = self.attrs[which, 0]
        slot = (torch.rand(n, generator=self.gen) * self.counts[digit]).long()
        images = render(self.masks[self.table[digit, slot]], self.attrs[which, 1], self.attrs[which, 2])
        return images, which

    def jitter(self, images: torch.Tensor, shift: int, noise: float) -> torch.Tensor:
        """Random shifts of up to `shift` pixels (one per batch) and Gaussian noise: robustness for judging samples."""
        dy, dx = torch.randint(-shift, shift + 1, (2,), generator=self.gen).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        return images + noise * torch.randn(images.shape, generator=self.gen)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_classifier(steps: int, batch: int, seed: int) -> AttributeClassifier:
    """Cross-entropy on the three heads, held-in combos, the digits' training split, shifted and noised."""
    torch.manual_seed(seed)
    model = AttributeClassifier()
    sampler = ComboSampler(held_in_combos(), digit_split(seed=seed)[0], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps)
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        images, which = sampler.draw(batch)
        targets = sampler.attrs[which]
        logits = model(sampler.jitter(images, shift=2, noise=0.1))
        loss = sum(F.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def train_vae(steps: int, batch: int, seed: int, kl_weight: float, lr: float):
    """MSE reconstruction + a small KL term on held-in renders; scaling_factor set to 1 / std of the latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    sampler = ComboSampler(held_in_combos(), torch.arange(len(digit_masks()[1])), seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    bar = tqdm(range(steps), desc="VAE")
    for step in bar:
        images, _ = sampler.draw(batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=sampler.gen)).sample
        mse = F.mse_loss(recon, images)
        loss = mse + kl_weight * posterior.kl().mean() / images[0].numel()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.5f}")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, combos: list[Combo]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std (M, C, h, w) of every digit image rendered in every combo, and each row's combo index."""
    masks, labels = digit_masks()
    means, stds, owners = [], [], []
    for k, combo in enumerate(tqdm(combos, desc="latents")):
        idx = (labels == combo.digit).nonzero().squeeze(1)
        images = render(masks[idx], torch.full((len(idx),), combo.fg), torch.full((len(idx),), combo.bg))
        dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        owners.append(torch.full((len(idx),), k))
    return torch.cat(means), torch.cat(stds), torch.cat(owners)


@torch.no_grad()
def center_latents(vae, means: torch.Tensor) -> torch.Tensor:
    """Fold the latents' per-channel mean into the VAE's 1x1 convolutions: the encoder's mean comes out centred and
    the decoder adds it back, so reconstructions are unchanged (PixArt's pipeline applies no shift_factor).
    Returns the per-channel mean that was removed."""
    mu = means.mean(dim=(0, 2, 3))
    vae.quant_conv.bias[: len(mu)] -= mu
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu
    return mu


def train_denoiser(text_encoder, transformer, tokenizer, latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   scale: float, prompts: list[str], steps: int, batch: int, lr: float, seed: int, dropout: float):
    """T5 encoder and PixArt transformer trained together (v-prediction, EMA); `dropout` of prompts become '' (CFG)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 2)
    means, stds, owners = latents
    tokens = tokenizer([*prompts, ""], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    null = len(prompts)
    params = [*text_encoder.parameters(), *transformer.parameters()]
    ema = EMAModel([p.detach().clone() for p in params], decay=0.999, use_ema_warmup=True, power=0.75)
    noise_sched = DDPMScheduler(**TRAIN_SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    text_encoder.train()
    transformer.train()
    bar = tqdm(range(steps), desc="text encoder + transformer")
    for step in bar:
        rows = torch.randint(0, len(owners), (batch,), generator=gen)
        z0 = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=gen)) * scale
        which = owners[rows].clone()
        which[torch.rand(batch, generator=gen) < dropout] = null
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        ids, mask = tokens.input_ids[which], tokens.attention_mask[which]
        text = text_encoder(ids, attention_mask=mask)[0]
        pred = transformer(noise_sched.add_noise(z0, noise, t), encoder_hidden_states=text, encoder_attention_mask=mask,
                           timestep=t.float(), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                           return_dict=False)[0]
        loss = F.mse_loss(pred, noise_sched.get_velocity(z0, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    return text_encoder.eval(), transformer.eval()


def evaluate(pipe_dir: Path, classifier: AttributeClassifier, vae, per_in: int, per_out: int, seed: int) -> dict:
    """Figures of the saved pipeline, loaded by the stock diffusers class, fp32, default steps and guidance."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(pipe_dir, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    _, test_digits = digit_split(seed=seed)
    figures: dict = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE, "max_sequence_length": TEXT_LEN,
                     "dtype": "float32"}
    for name, combos, per, offset in (("held_in", held_in_combos(), per_in, 1000), ("held_out", held_out_combos(), per_out, 2000)):
        asked = [c for c in combos for _ in range(per)]
        started = time.perf_counter()
        images = torch.cat([generate(pipe, [c.prompt for c in asked[i : i + 300]], seed + offset + i, DEFAULT_STEPS,
                                     DEFAULT_GUIDANCE, TEXT_LEN) for i in tqdm(range(0, len(asked), 300), desc=f"sample {name}")])
        seconds = time.perf_counter() - started
        real, _ = render_combos(combos, per, seed=seed + offset)
        real_b, _ = render_combos(combos, per, seed=seed + offset + 1)
        real_test, _ = render_combos(combos, per, seed=seed + offset + 2, pool=test_digits)
        with torch.no_grad():
            recon = vae.decode(vae.encode(real_test).latent_dist.mean).sample
        figures[name] = {
            "combos": len(combos), "samples": len(asked), "sampling_seconds": round(seconds, 1),
            "generated": _rounded(judge(classifier, images, asked)),
            "fd_generated_vs_real": round(attribute_fd(classifier, images, real), 3),
            "fd_real_vs_real": round(attribute_fd(classifier, real_b, real), 3),
            "classifier_on_real_test_digits": _rounded(judge(classifier, real_test, asked)),
            "classifier_on_vae_reconstructions": _rounded(judge(classifier, recon.clamp(-1, 1), asked)),
        }
        print(f"{name}: {figures[name]}")
    return figures


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=t2i_dir(), help="output pipeline directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL sum against the summed squared error")
    parser.add_argument("--steps", type=int, default=3500, help="text encoder + transformer iterations")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--eval-held-in", type=int, default=2, help="samples per held-in combination (270)")
    parser.add_argument("--eval-held-out", type=int, default=10, help="samples per held-out combination (30)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    started = time.perf_counter()
    record_machine = machine()
    seconds: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    classifier = train_classifier(args.classifier_steps, 128, args.seed)
    lap("classifier", t0)
    t0 = time.perf_counter()
    vae = train_vae(args.vae_steps, args.vae_batch, args.seed, args.kl_weight, args.vae_lr)
    lap("vae", t0)
    t0 = time.perf_counter()
    combos = held_in_combos()
    means, stds, owners = encode_all(vae, combos)
    shift = center_latents(vae, means)
    latents = (means - shift[None, :, None, None], stds, owners)
    scale = float(1.0 / latents[0].std())
    vae.register_to_config(scaling_factor=scale)
    lap("latents", t0)
    t0 = time.perf_counter()
    parts = build_components(args.seed)
    text_encoder, transformer = train_denoiser(parts["text_encoder"], parts["transformer"], parts["tokenizer"], latents,
                                               scale, [c.prompt for c in combos], args.steps, args.batch, args.lr,
                                               args.seed, args.prompt_dropout)
    lap("text_encoder_and_transformer", t0)
    train_seconds = time.perf_counter() - started
    scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler(**TRAIN_SCHEDULER_CONFIG).config)
    pipe = PixArtSigmaPipeline(tokenizer=parts["tokenizer"], text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)

    # Everything goes into a temp dir beside OUT, is evaluated there, then swapped in: OUT is never half-written.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the asset is read by whoever installs the package
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        classifier.save(staging / CLASSIFIER_SUBFOLDER)
        t0 = time.perf_counter()
        figures = evaluate(staging, classifier, vae, args.eval_held_in, args.eval_held_out, args.seed)
        lap("evaluation", t0)
        sizes = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*.safetensors"))}
        write_json(staging / RECORD_NAME, {
            "format": "tmpdiff.t2i/1",
            "pipeline": "PixArtSigmaPipeline",
            "image_size": VAE_CONFIG["sample_size"],
            "max_sequence_length": TEXT_LEN,
            "default_steps": DEFAULT_STEPS,
            "guidance_scale": DEFAULT_GUIDANCE,
            "call": "pipe(prompt, max_sequence_length=16, use_resolution_binning=False, clean_caption=False)",
            "data": "sklearn.datasets.load_digits 8x8 ink, bilinear to 32x32, digit colour over background colour, [-1, 1]",
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "prompt": "a <colour> <digit> on a <colour> background",
            "held_out": [c.prompt for c in held_out_combos()],
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                           (("text_encoder", text_encoder), ("vae", vae), ("transformer", transformer),
                            ("classifier", classifier))},
            "safetensors_bytes": sizes,
            "training": {
                "seed": args.seed, "seconds": round(train_seconds, 1), "stage_seconds": seconds,
                "wall_seconds_with_evaluation": round(time.perf_counter() - started, 1),
                "machine": record_machine,
                "classifier": {"steps": args.classifier_steps, "batch": 128, "lr": 2e-3},
                "vae": {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr, "kl_weight": args.kl_weight,
                        "scaling_factor": round(scale, 6),
                        "latent_mean_folded_into_biases": [round(float(x), 6) for x in shift]},
                "text_encoder_and_transformer": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                                 "prompt_dropout": args.prompt_dropout, "ema": 0.999,
                                                 "noise": TRAIN_SCHEDULER_CONFIG},
                "configs": {"t5": T5_CONFIG, "vae": VAE_CONFIG, "transformer": TRANSFORMER_CONFIG},
            },
            "figures": figures,
        })
        replace_directory(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
