"""The bundled text-to-image pipeline: a tiny PixArt-Sigma (T5 encoder, AutoencoderKL, PixArt transformer).

Component configs and the word-level tokenizer live here so the training script and the tests build the
same thing; the trained pipeline itself is a plain diffusers directory (`PixArtSigmaPipeline.from_pretrained`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from tmpdiff.models.colored_digits import COLOUR_NAMES, IMAGE_SIZE, NUM_DIGITS

T2I_NAME = "tiny-t2i"
RECORD_NAME = "tmpdiff_t2i.json"  # not tmpdiff_model.json: that name marks a class-conditional model directory
CLASSIFIER_SUBFOLDER = "classifier"
TEXT_LEN = 16  # max_sequence_length to pass the pipeline (its default, 300, works too: padding is masked)
DEFAULT_STEPS = 20  # PixArtSigmaPipeline's default
DEFAULT_GUIDANCE = 4.5  # PixArtSigmaPipeline's default
LATENT_CHANNELS = 4
VAE_FACTOR = 4  # 32x32 images <-> 8x8 latents

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1, unk 2
WORDS = ("a", "an", "on", "background", "digit", *COLOUR_NAMES, *(str(d) for d in range(NUM_DIGITS)))

T5_CONFIG: dict[str, Any] = {
    "vocab_size": len(SPECIAL_TOKENS) + len(WORDS), "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
    "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS, "sample_size": IMAGE_SIZE,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8,
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "num_layers": 6, "cross_attention_dim": 128, "caption_channels": T5_CONFIG["d_model"],
    "sample_size": IMAGE_SIZE // VAE_FACTOR, "patch_size": 2, "norm_type": "ada_norm_single",
    "use_additional_conditions": False, "attention_bias": True, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "norm_elementwise_affine": False, "norm_eps": 1e-6,
}

# v-prediction on the cosine schedule: x0 = alpha * x - sigma * v stays well-conditioned at t = 999, where
# alpha ~ 5e-5 (an epsilon model's x0 would divide by it); the terminal SNR is ~0, so no colour leaks into t = 999.
TRAIN_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
}


def t2i_dir() -> Path:
    """Directory of the bundled text-to-image pipeline inside the installed package."""
    return Path(str(resources.files("tmpdiff") / "assets" / T2I_NAME))


def build_tokenizer(max_length: int = TEXT_LEN):
    """A transformers fast tokenizer over the prompt vocabulary: lower-cased words, punctuation dropped, '</s>' last."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def build_components(seed: int = 0) -> dict[str, Any]:
    """Fresh, randomly initialised components (seeded) keyed by their PixArtSigmaPipeline names."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return {
        "tokenizer": build_tokenizer(),
        "text_encoder": T5EncoderModel(T5Config(**T5_CONFIG)),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "transformer": PixArtTransformer2DModel(**TRANSFORMER_CONFIG),
        "scheduler": DPMSolverMultistepScheduler(**TRAIN_SCHEDULER_CONFIG),
    }
