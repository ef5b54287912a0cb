"""Tiny random diffusers pipelines built in-process (no downloads): text encoders, tokenizers, VAE, denoiser.

Tokenizers are word-level over a small vocabulary; text encoders are CLIP/T5 with random weights. Sizes are
the smallest the architectures accept, so a pipeline call takes well under a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "on", "the", "hill")
SIZE = 16  # image pixels; the VAE below downsamples by 2, so latents are 8x8
TEXT_LEN = 8  # tokens per text encoder (the exported graphs are fixed to this)
SANA_SIZE = 32  # Sana's pipeline wants image sides divisible by 32


def word_tokenizer(max_length: int, bos: bool = False):
    """A fast tokenizer with a word-level vocabulary, padding to `max_length` and an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>", "<s>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if bos else "$A </s>"
    core.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 2), ("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=max_length)


def clip_text_encoder(hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_dim=projection,
                            pad_token_id=0, bos_token_id=3, eos_token_id=2)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def t5_text_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(WORDS) + 4, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int, **scaling):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=SIZE,
                         **scaling).eval()


def pixart_sigma():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    # Learned sigma (out_channels 2 x in): the pipeline keeps the eps half, which is what the graph returns.
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=64, caption_channels=32, sample_size=SIZE // 2,
                                           patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False)
    return PixArtSigmaPipeline(tokenizer=word_tokenizer(TEXT_LEN), text_encoder=t5_text_encoder(32), vae=tiny_vae(4),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    # Joint text tokens: TEXT_LEN from the two CLIPs (padded to joint_attention_dim) + TEXT_LEN from T5.
    transformer = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4, shift_factor=0.1),
        text_encoder=clip_text_encoder(32, 32, True), tokenizer=word_tokenizer(TEXT_LEN, bos=True),
        text_encoder_2=clip_text_encoder(32, 32, True), tokenizer_2=word_tokenizer(TEXT_LEN, bos=True),
        text_encoder_3=t5_text_encoder(64), tokenizer_3=word_tokenizer(TEXT_LEN))


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    # 16 channels in = 4 VAE latent channels packed as 2x2 patches.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                         num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                                         guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4, shift_factor=0.1),
                        text_encoder=clip_text_encoder(32, 32, False), tokenizer=word_tokenizer(TEXT_LEN, bos=True),
                        text_encoder_2=t5_text_encoder(64), tokenizer_2=word_tokenizer(TEXT_LEN), transformer=transformer)


def sd15():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    # DDIM keeps no step_index: the drop-in counts the calls of each run instead.
    unet = UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return StableDiffusionPipeline(vae=tiny_vae(4), text_encoder=clip_text_encoder(32, 32, False),
                                   tokenizer=word_tokenizer(TEXT_LEN, bos=True), unet=unet,
                                   # what the pipeline would rewrite a default DDIM config to (with a FutureWarning)
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl_unet(cross_attention_dim: int, time_ids: int):
    """A tiny SDXL-layout UNet: pooled text width 32 (text_encoder_2's projection) + `time_ids` x 8 added conditions."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + time_ids * 8,
                                use_linear_projection=True)


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    # Added conditioning: pooled text (32, text_encoder_2's projection) + 6 time ids x 8, through added_cond_kwargs.
    unet = _sdxl_unet(cross_attention_dim=64, time_ids=6)
    return StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=clip_text_encoder(32, 32, False),
                                     text_encoder_2=clip_text_encoder(32, 32, True), tokenizer=word_tokenizer(TEXT_LEN, bos=True),
                                     tokenizer_2=word_tokenizer(TEXT_LEN, bos=True), unet=unet, scheduler=EulerDiscreteScheduler())


def sdxl_refiner():
    """SDXL's refiner layout: img2img with an aesthetic score, so 5 time ids (sizes, crop, score) x 8 beside the pooled
    text (32, text_encoder_2's projection); only the second text encoder, as the refiner ships."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    unet = _sdxl_unet(cross_attention_dim=32, time_ids=5)
    return StableDiffusionXLImg2ImgPipeline(vae=tiny_vae(4), text_encoder=None, text_encoder_2=clip_text_encoder(32, 32, True),
                                            tokenizer=None, tokenizer_2=word_tokenizer(TEXT_LEN, bos=True), unet=unet,
                                            scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True)


def gemma_text_encoder(hidden: int):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                          pad_token_id=0, eos_token_id=2, bos_token_id=3)
    return Gemma2Model(config).eval()


def sana():
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                                         num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                                         caption_channels=32, sample_size=SANA_SIZE // 2, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), upsample_block_type="interpolate",
                        downsample_block_type="stride_conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    # Sana's pipeline keeps max_sequence_length tokens after its chat-instruction prefix.
    return SanaPipeline(tokenizer=word_tokenizer(512, bos=True), text_encoder=gemma_text_encoder(32), vae=vae,
                        transformer=transformer, scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                                       use_flow_sigmas=True, flow_shift=3.0))


# Per pipeline: builder, the graph sizes to export (`export_model(graph_sizes=...)`, `--text-len`, `--sample-size`),
# and the call arguments that match them.
PIPELINES = {
    "pixart": (pixart_sigma, {"text_len": TEXT_LEN},
               {"max_sequence_length": TEXT_LEN, "use_resolution_binning": False, "clean_caption": False}),
    "sd3": (sd3, {"text_len": 2 * TEXT_LEN}, {"max_sequence_length": TEXT_LEN}),
    "flux": (flux, {"text_len": TEXT_LEN, "sample_size": SIZE // 2}, {"max_sequence_length": TEXT_LEN}),
    "sd15": (sd15, {"text_len": TEXT_LEN}, {}),
    "sdxl": (sdxl, {"text_len": TEXT_LEN, "time_ids": 6}, {}),  # a UNet directory outside its pipeline: given
    "sana": (sana, {"text_len": TEXT_LEN}, {"max_sequence_length": TEXT_LEN, "use_resolution_binning": False,
                                            "height": SANA_SIZE, "width": SANA_SIZE}),
}


def build(name: str, seed: int = 0):
    """The named pipeline with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return PIPELINES[name][0]()


def save_denoiser(pipe, directory: Path) -> Path:
    """The pipeline's denoiser saved as a diffusers model directory (safetensors)."""
    (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).save_pretrained(directory, safe_serialization=True)
    return directory


def dit_pipeline():
    """A class-conditional latent DiT pipeline (no prompts): DiTPipeline hard-codes ImageNet's null class 1000, so the
    label table has 1000 classes; a learned-sigma output (8 channels for 4 latent ones), as DiT-XL/2 has."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=SIZE // 2, patch_size=2, num_embeds_ada_norm=1000)
    return DiTPipeline(transformer=transformer.eval(), vae=tiny_vae(4), scheduler=DDIMScheduler())
