"""Adapter for diffusers' `UNet2DConditionModel`: SD1.x/2.x cross-attention and SDXL added conditioning."""

from __future__ import annotations

from pathlib import Path

import torch

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.specs import TensorSpec
from tmpdiff.models.adapter import DenoiserAdapter, computing_in

# SDXL micro-conditioning time ids: the base model takes original size (2), crop top-left (2), target size (2); the
# refiner (its pipeline's `requires_aesthetics_score`) original size (2), crop top-left (2), aesthetic score (1).
# The UNet config gives only their product with the pooled text width, so the count is config key `time_ids`
# (`resolve_time_ids` sets it at export); a build exported before that key existed took 6.
TIME_IDS = 6
REFINER_TIME_IDS = 5
SDXL_POOLED_DIM = 1280  # text_encoder_2's projection_dim (OpenCLIP ViT-bigG) in SDXL base and refiner alike
TIME_IDS_HELP = "6 for an SDXL base UNet (sizes and crop), 5 for an SDXL refiner's (sizes, crop, aesthetic score)"


class _UNetForExport(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, added_cond: bool) -> None:
        super().__init__()
        self.model = computing_in(model, dtype)
        self.dtype = dtype
        self.added_cond = added_cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        added_cond_kwargs = None
        if self.added_cond:
            text_embeds, time_ids = added
            added_cond_kwargs = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids}
        out = self.model(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype),
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return out.float()


class UNetAdapter(DenoiserAdapter):
    """Inputs: sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, text_len, cross_attention_dim);
    with `addition_embed_type="text_time"` (SDXL) also text_embeds (B, pooled dim) and time_ids (B, `time_ids`: 6 for
    the base model, 5 for the refiner). All float32.

    `text_len` (config key, default 77: CLIP's context) fixes the text sequence length.
    """

    default_text_len = 77
    architecture = "UNet2DConditionModel"

    def latent_sides(self) -> list:
        size = self.config.get("sample_size")
        return list(size) if isinstance(size, list | tuple) and len(size) == 2 else [size]

    @property
    def latent_hw(self) -> tuple[int, int]:
        size = self.config["sample_size"]
        height, width = size if isinstance(size, list | tuple) else (size, size)
        return int(height), int(width)

    @property
    def text_dim(self) -> int:
        """Width of encoder_hidden_states: encoder_hid_dim when the UNet projects it, else cross_attention_dim."""
        dim = self.config.get("encoder_hid_dim") or self.config["cross_attention_dim"]
        return int(dim[0] if isinstance(dim, list | tuple) else dim)

    def unsupported(self) -> str | None:
        added = self.config.get("addition_embed_type")
        if added not in (None, "text_time") or self.config.get("class_embed_type") or self.config.get("num_class_embeds"):
            return (f"UNet2DConditionModel with addition_embed_type={added!r}, class_embed_type="
                    f"{self.config.get('class_embed_type')!r} is not supported (plain or SDXL text_time only)")
        if self.config.get("time_cond_proj_dim"):
            return (f"UNet2DConditionModel with time_cond_proj_dim={self.config['time_cond_proj_dim']} (a Latent "
                    "Consistency Model UNet) is not supported: its pipeline passes timestep_cond (the guidance-scale "
                    "embedding), which the exported graph would not take, so the graph would not compute the model")
        return None

    @property
    def sdxl(self) -> bool:
        """SDXL-style added conditioning (pooled text embeds + size/crop time ids)."""
        problem = self.unsupported()
        if problem is not None:
            raise TmpdiffError(problem)
        return self.config.get("addition_embed_type") == "text_time"

    @property
    def time_ids(self) -> int:
        """How many micro-conditioning time ids the graph takes (config key `time_ids`; 6 when absent)."""
        return int(self.config.get("time_ids", TIME_IDS))

    @property
    def text_embeds_dim(self) -> int:
        return int(self.config["projection_class_embeddings_input_dim"]) - self.time_ids * int(self.config["addition_time_embed_dim"])

    def size_problem(self) -> tuple[str, str] | None:
        problem = super().size_problem()
        if problem is not None or "time_ids" not in self.config:
            return problem
        count = self.config["time_ids"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return "time_ids", f"must be a positive integer, got {count!r}"
        if self.config.get("addition_embed_type") == "text_time" and self.text_embeds_dim < 1:
            return "time_ids", (f"{count} x addition_time_embed_dim {self.config['addition_time_embed_dim']} leaves no "
                                f"pooled text width of projection_class_embeddings_input_dim "
                                f"{self.config['projection_class_embeddings_input_dim']}")
        return None

    def input_specs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("sample", "float32", ("batch", self.channels, *self.latent_hw)),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", self.text_len, self.text_dim)),
        ]
        if self.sdxl:
            specs += [TensorSpec("text_embeds", "float32", ("batch", self.text_embeds_dim)),
                      TensorSpec("time_ids", "float32", ("batch", self.time_ids))]
        return specs

    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec("noise_pred", "float32", ("batch", self.out_channels, *self.latent_hw))]

    def export_module(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return _UNetForExport(model, dtype, self.sdxl).eval()

    def float_range(self, name: str) -> tuple[float, float] | None:
        if name == "timestep":
            return 0.0, 999.0
        if name == "time_ids":
            return 0.0, 8.0 * max(self.latent_hw)  # pixel sizes and crop offsets
        return None


def resolve_time_ids(model_dir: Path, config: dict) -> dict:
    """`config` with `time_ids` set for an SDXL-style (text_time) UNet that does not give it (config.json or
    --time-ids): from the pipeline directory the UNet is a component of - text_encoder_2's projection_dim is the pooled
    text width, whatever is left of projection_class_embeddings_input_dim is the time ids; else model_index.json's
    `requires_aesthetics_score` (the refiner's 5, else 6). A UNet directory outside a pipeline takes the count that
    leaves SDXL's pooled width (1280) when one does (SDXL base and refiner as they ship); otherwise it is refused: its
    config gives only the product, and a wrong count exports a graph the pipeline cannot feed."""
    if config.get("addition_embed_type") != "text_time" or "time_ids" in config:
        return config
    from tmpdiff.formats.atomic import read_json_object

    pipeline = model_dir.parent
    index_path = pipeline / "model_index.json"
    if not index_path.is_file():
        # alone: SDXL's own widths tell base (2816 = 1280 + 6 x 256) from refiner (2560 = 1280 + 5 x 256)
        total, per_id = int(config["projection_class_embeddings_input_dim"]), int(config["addition_time_embed_dim"])
        shipped = [n for n in (TIME_IDS, REFINER_TIME_IDS) if total - n * per_id == SDXL_POOLED_DIM]
        if len(shipped) == 1:
            return config | {"time_ids": shipped[0]}
        raise TmpdiffError(f"an SDXL-style UNet outside its pipeline directory: its config does not say how many time "
                           f"ids it takes; pass --time-ids ({TIME_IDS_HELP}), or export it from the pipeline "
                           "directory (MODEL --subfolder unet)", model_dir)
    found: dict[str, int] = {}
    encoder_path = pipeline / "text_encoder_2" / "config.json"
    if encoder_path.is_file():
        pooled = read_json_object(encoder_path).get("projection_dim")
        rest = int(config["projection_class_embeddings_input_dim"]) - int(pooled or 0)
        per_id = int(config["addition_time_embed_dim"])
        if isinstance(pooled, int) and pooled > 0 and rest > 0 and rest % per_id == 0:
            found[str(encoder_path)] = rest // per_id
    index = read_json_object(index_path)
    if "requires_aesthetics_score" in index or not found:
        found[str(index_path)] = REFINER_TIME_IDS if index.get("requires_aesthetics_score") else TIME_IDS
    if len(set(found.values())) > 1:
        said = ", ".join(f"{count} from {path}" for path, count in found.items())
        raise TmpdiffError(f"the pipeline's files disagree on the UNet's time ids ({said}); pass --time-ids "
                           f"({TIME_IDS_HELP})", pipeline)
    return config | {"time_ids": next(iter(found.values()))}
