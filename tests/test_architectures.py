"""Every supported denoiser family end to end: a tiny random model saved as a diffusers directory ->
`export_model` (fp32 + quantized) -> ONNX Runtime parity, graph census, and a batch-flexible fp32 graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch

from tmpdiff.engines.ort import OrtEngine, session_options
from tmpdiff.export.exporter import PARITY_SEEDS, export_model
from tmpdiff.export.quantize import restore_quantized
from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.formats.precisions import HIGH_PRECISION_PATTERNS, PRECISIONS
from tmpdiff.models.registry import ADAPTERS, adapter_for_config

# Widths are multiples of 64 (PixArt: 96, as its size conditioning splits the width in thirds) so every
# quantized Linear's in_features divides into int4 blocks.


def _dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _unet(sdxl: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        extra = {}
        if sdxl:  # SDXL: linear proj_in/out, pooled text (32) + 6 time ids x addition_time_embed_dim (8)
            extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                     "projection_class_embeddings_input_dim": 32 + 6 * 8, "use_linear_projection": True}
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8, **extra)

    return build


def _sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    # SD3.5 layout: dual attention in the first block, RMS q/k norms.
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
                                 pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                                  axes_dims_rope=(8, 12, 12))


def _sana() -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                                  num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                                  caption_channels=64, sample_size=8, patch_size=1)


def _pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    # Learned sigma (out_channels = 2 x in) and PixArt-alpha's resolution / aspect-ratio conditioning.
    return PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
                                    cross_attention_dim=96, caption_channels=64, sample_size=8, patch_size=2,
                                    use_additional_conditions=True)


@dataclass(frozen=True)
class Case:
    build: Callable[[], torch.nn.Module]
    precisions: tuple[str, ...]
    config: dict = field(default_factory=lambda: {"text_len": 8})  # tmpdiff keys written into config.json
    rounding_ties: bool = False  # deep quantized stack where one activation rounding differently flips the output


ALL = ("fp32", "int8", "fp8", "int4")
CASES = {
    "dit": Case(_dit, ALL, {}),
    # int4 is left out where Conv layers are quantized: see test_int4_with_conv_layers_kept_high_precision.
    # UNet int8 parity (1.7e-2 and 1.8e-2 here, tolerance 2e-2) is close to its limit: one activation rounding
    # differently in ORT and torch flips quantization steps downstream through the UNet's GroupNorm/resnet stack.
    # int4 on the SD1.5 UNet: its transformer blocks' proj_in/proj_out are 1x1 convs and stay high precision.
    "unet-sd15": Case(_unet(sdxl=False), ALL, rounding_ties=True),
    "unet-sdxl": Case(_unet(sdxl=True), ALL, {"text_len": 8, "time_ids": 6}, rounding_ties=True),
    "sd3": Case(_sd3, ALL),
    "flux": Case(_flux, ALL, {"text_len": 8, "sample_size": 8}),
    "sana": Case(_sana, ("fp32", "int8", "fp8")),
    "pixart": Case(_pixart, ALL),
}


def _save(case: Case, directory) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build().eval()
    if case.config:
        model.register_to_config(**case.config)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    case = CASES[name]
    root = tmp_path_factory.mktemp(name)
    model = _save(case, root / "model")
    build_dir, outcomes = export_model(root / "model", root / "build", list(case.precisions), model_id=name)
    adapter = adapter_for_config(dict(model.config) | {"_class_name": type(model).__name__})
    return name, model, adapter, build_dir, {o.precision: o for o in outcomes}


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


FRESH_SEEDS = (31, 32, 33)  # not the exporter's PARITY_SEEDS: inputs the export never checked


def _check_fresh_parity(name: str, precision: str, model: torch.nn.Module, adapter, build_dir, onnx_path) -> None:
    """The saved ORT graph, run by onnxruntime itself, against the torch model it came from (for quantized
    precisions: the fake-quant model restored from the saved state) on fresh random batches, seed by seed.

    Every graph must match within the precision's parity tolerance (measured on these seeds: fp32 <= 6.6e-7,
    int4 <= 2.6e-7, int8 / fp8 of the transformers <= 4.1e-4), except the quantized UNets: there ORT's other
    float rounding puts a few activations on the other side of a quantization tie, and one flip moves the output
    by 1e-2..5e-2 - torch alone does the same (fake-quant UNet, input scaled by 1 + 1e-7 or 1e-6: 1.3e-2..5.3e-2
    on 6 of 12 seed/precision pairs). ORT vs torch measured 2.0e-2..3.0e-2 on every seed for int8, 4e-7..6.6e-2
    for fp8. For those the bound is that ORT is closer to the fake-quant model than the fake-quant model is to
    fp32 (ratio <= 0.77 measured on an AMD EPYC, 0.93 on an Intel Xeon with AMX, whose ORT int8 kernels differ:
    bound 1), and ORT's error vs fp32 is torch's within 20% (<= 11% measured):
    same quantization, another noise draw. A twin missing its quantizers (error vs fp32 ~0) or with wrong scales
    (error far from torch's) fails either way.
    """
    import onnxruntime as ort

    assert not set(FRESH_SEEDS) & set(PARITY_SEEDS)
    spec = PRECISIONS[precision]
    session = ort.InferenceSession(str(onnx_path), sess_options=session_options(optimization=spec.ort_optimization),
                                   providers=["CPUExecutionProvider"])
    source = model if spec.modelopt_cfg is None else restore_quantized(model, build_dir / precision)
    reference, fake_quant = adapter.export_module(model), adapter.export_module(source)
    for seed in FRESH_SEEDS:
        inputs = adapter.sample_inputs(adapter.default_dims(2), seed=seed)
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            want, fp32 = fake_quant(*inputs.values()).numpy(), reference(*inputs.values()).numpy()
        assert np.isfinite(got).all(), f"{name} {precision} seed {seed}: non-finite output"
        parity, ort_error, torch_error = _relative(got, want), _relative(got, fp32), _relative(want, fp32)
        where = f"{name} {precision} seed {seed}: ORT vs torch {parity:.2e}, vs fp32 ORT {ort_error:.2e} torch {torch_error:.2e}"
        if parity <= spec.parity_tolerance:
            continue
        assert CASES[name].rounding_ties and spec.modelopt_cfg is not None, where
        assert parity < torch_error and abs(ort_error - torch_error) <= 0.2 * torch_error, where


def test_registry_knows_every_family():
    assert {"DiTTransformer2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
            "SanaTransformer2DModel", "PixArtTransformer2DModel"} <= set(ADAPTERS)


def test_export_parity_and_census(exported):
    name, model, adapter, build_dir, outcomes = exported
    assert list(outcomes) == list(CASES[name].precisions)
    for precision, outcome in outcomes.items():
        entry = outcome.entry
        assert not outcome.skipped and outcome.onnx_path.is_file()
        _check_fresh_parity(name, precision, model, adapter, build_dir, outcome.onnx_path)
        if precision == "fp32":
            assert entry.error_vs_fp32 < 1e-4
            continue
        assert entry.error_vs_fp32 > 0, f"{name} {precision}: quantization changed nothing"
        census = entry.quantization["census"]
        if precision == "int4":  # weight-only
            assert census["weight_quantized"] > 0 and census["input_quantized"] == 0, census
        else:
            assert census["both_quantized"] > 0, census


@pytest.mark.parametrize("batch", [1, 5])  # the export traced batch 2
def test_fp32_graph_matches_torch_at_other_batch_sizes(exported, batch):
    name, model, adapter, build_dir, outcomes = exported
    inputs = adapter.sample_inputs(adapter.default_dims(batch), seed=100 + batch)
    for spec in adapter.input_specs():
        spec.check(tuple(inputs[spec.name].shape), inputs[spec.name].numpy().dtype, adapter.default_dims(batch))
    got = OrtEngine(outcomes["fp32"].onnx_path).infer({k: v.numpy() for k, v in inputs.items()})["noise_pred"]
    with torch.no_grad():
        want = adapter.export_module(model)(*inputs.values()).numpy()
    assert got.shape == adapter.output_specs()[0].concrete(adapter.default_dims(batch))
    assert _relative(got, want) < 1e-4, f"{name} batch {batch}: relative error {_relative(got, want):.2e}"


def _damaged(twin: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The twin with one quantized layer's weight scales damaged as a layout bug would: int8 x1.5, int4 shifted by
    one output channel."""
    from onnx import numpy_helper

    damaged = onnx.ModelProto()
    damaged.CopyFrom(twin)
    inits = {t.name: t for t in damaged.graph.initializer}
    blocked = precision == "int4"
    node = next(n for n in damaged.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and numpy_helper.to_array(inits[n.input[1]]).size > 1
                and any(a.name == "block_size" for a in n.attribute) == blocked)
    scale = numpy_helper.to_array(inits[node.input[1]])
    scale = np.roll(scale, 1, axis=1) if blocked else scale * 1.5
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(scale, node.input[1]))
    return damaged


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_twin_with_one_layer_of_damaged_scales_is_refused(exported, precision, tmp_path):
    """One of the tiny SD3's quantized layers with wrong scales: int8's passed the 2e-2 tolerance, int4's the 1.5x
    rounding-tie rule (int4 quantizes no activation: nothing ties)."""
    from tmpdiff.export.exporter import _parity, parity_ok, parity_outputs

    name, model, adapter, build_dir, outcomes = exported
    if name != "sd3":
        pytest.skip("one transformer is enough")
    reference = parity_outputs(adapter, adapter.export_module(model))
    expected = parity_outputs(adapter, adapter.export_module(restore_quantized(model, build_dir / precision)), reference)
    onnx.save(_damaged(onnx.load(outcomes[precision].onnx_path), precision), str(tmp_path / "damaged.onnx"))
    honest = _parity(outcomes[precision].onnx_path, precision, expected, reference)
    damaged = _parity(tmp_path / "damaged.onnx", precision, expected, reference)
    assert damaged[0] > 10 * honest[0], (honest, damaged)  # the damage is real
    assert parity_ok(precision, *honest)  # a transformer loaded in fp32: no rounding-tie allowance
    assert not parity_ok(precision, *damaged), damaged


def test_int4_with_conv_layers_kept_high_precision(tmp_path):
    """int4 (W4A16) is a GEMM format: Sana's GLUMBConv feed-forward stays high precision, attention goes int4."""
    _save(CASES["sana"], tmp_path / "model")
    _, [outcome] = export_model(tmp_path / "model", tmp_path / "build", ["int4"], model_id="sana",
                                keep_high_precision=(*HIGH_PRECISION_PATTERNS, "*.ff.conv_*"))
    assert outcome.entry.parity_error < PRECISIONS["int4"].parity_tolerance
    assert outcome.entry.quantization["census"]["weight_quantized"] > 0


def test_adapter_specs_follow_config():
    flux = adapter_for_config({"_class_name": "FluxTransformer2DModel", "in_channels": 64, "joint_attention_dim": 4096,
                               "pooled_projection_dim": 768, "guidance_embeds": False})
    assert [s.name for s in flux.input_specs()] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                                   "img_ids", "txt_ids"]
    assert flux.input_specs()[0].shape == ("batch", 4096, 64) and flux.input_specs()[4].shape == (4096, 3)

    sdxl = adapter_for_config({"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 128,
                               "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                               "projection_class_embeddings_input_dim": 2816, "time_ids": 6})
    shapes = {s.name: s.shape for s in sdxl.input_specs()}
    assert shapes["text_embeds"] == ("batch", 1280) and shapes["time_ids"] == ("batch", 6)
    assert shapes["encoder_hidden_states"] == ("batch", 77, 2048)
    refiner = adapter_for_config({"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 128,
                                  "cross_attention_dim": 1280, "addition_embed_type": "text_time",
                                  "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2560,
                                  "time_ids": 5})
    shapes = {s.name: s.shape for s in refiner.input_specs()}
    assert shapes["text_embeds"] == ("batch", 1280) and shapes["time_ids"] == ("batch", 5)

    pixart = adapter_for_config({"_class_name": "PixArtTransformer2DModel", "in_channels": 4, "sample_size": 128,
                                 "patch_size": 2, "caption_channels": 4096, "cross_attention_dim": 1152})
    assert [s.name for s in pixart.input_specs()][-2:] == ["resolution", "aspect_ratio"]

    upscaler = adapter_for_config({"_class_name": "UNet2DConditionModel", "in_channels": 7, "sample_size": 32,
                                   "cross_attention_dim": 1024, "num_class_embeds": 1000})
    with pytest.raises(TmpdiffError, match="not supported"):
        upscaler.input_specs()


def test_a_unet_loaded_in_16_bits_exports_int8_fp8_and_int4(tmp_path):
    """An SDXL-style UNet quantized from its 16-bit weights (what an SDXL-size model gets on a 24 GB machine),
    calibrated, traced and parity-checked in fp16 (CPU convolutions computed in fp32). ModelOpt's fp32 int4 Q/DQ hand
    fp32 on in the fp16 graph (a quantized `proj_in` fed an fp16 LayerNormalization: ONNX Runtime refused the graph),
    and int8's Half Q/DQ fuse no GEMM in ONNX Runtime: their twins compute in fp32 outside the quantized weights, and
    ONNX Runtime fuses the int8 GEMMs exactly as in the twin made from an fp32 load."""
    from tmpdiff.engines.build import build_engines
    from tmpdiff.formats.manifest import load_manifest

    _save(CASES["unet-sdxl"], tmp_path / "model")
    half, _ = export_model(tmp_path / "model", tmp_path / "half", ["int8", "fp8", "int4"], model_id="unet",
                           load_dtype="float16")
    full, _ = export_model(tmp_path / "model", tmp_path / "full", ["int8"], model_id="unet", load_dtype="float32")
    manifest = load_manifest(half)
    for precision in ("int8", "fp8", "int4"):
        entry = manifest.precisions[precision]
        assert entry.reference_dtype == "float16" and entry.quantization["census"]["weight_quantized"] > 0, precision
        assert entry.error_vs_fp32 < 0.2, precision
    twin = onnx.load(half / manifest.precisions["int8"].onnx)
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in twin.graph.initializer)
    assert manifest.precisions["int8"].quantization["rewrite"]["ort"]["upcast_initializers"] > 0
    # the fp8 twin keeps its 16-bit graph (modelopt's fp8 exporter casts back itself)
    assert "upcast_initializers" not in manifest.precisions["fp8"].quantization["rewrite"]["ort"]
    producers = {out: node for node in twin.graph.node for out in node.output}
    quantized_convs = [n for n in twin.graph.node if n.op_type == "Conv" and n.input[1] in producers
                       and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert quantized_convs  # convolutions are quantized, not only the attention GEMMs
    fused = {}
    for name, build_dir in (("half", half), ("full", full)):
        build_engines(build_dir, "ort", "cpu", precisions=["int8"])
        engine = onnx.load(build_dir / "int8" / "model.ort-cpu.onnx", load_external_data=False)
        fused[name] = sum(n.op_type == "MatMulIntegerToFloat" for n in engine.graph.node)
    assert fused["half"] == fused["full"] > 0
    # as close to the 16-bit model as the fp32-made int8 engine is to the fp32 model (rounding ties allowed: 1.5x)
    assert manifest.precisions["int8"].error_vs_fp32 < 1.5 * load_manifest(full).precisions["int8"].error_vs_fp32


def _refiner_pipeline_dir(root):
    from tests import tiny_pipelines

    torch.manual_seed(0)
    pipe = tiny_pipelines.sdxl_refiner()
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return pipe, root / "pipe"


def test_an_sdxl_refiner_exports_from_its_pipeline_with_the_inputs_the_pipeline_passes(tmp_path):
    """The refiner's UNet takes 5 time ids (sizes, crop, aesthetic score): its config gives only 5 x 8 + 32 = 72, so the
    count comes from its pipeline directory. The fp32 engine then runs inside the img2img pipeline at strength 0.5 and
    reproduces the torch pipeline's latents (a graph taking 6 time ids and 24 pooled widths cannot be fed there)."""
    from tests import tiny_pipelines
    from tmpdiff.engines.build import build_engines
    from tmpdiff.formats.manifest import load_manifest
    from tmpdiff.runtime.dropin import attach_engines

    pipe, pipe_dir = _refiner_pipeline_dir(tmp_path)
    build_dir, _ = export_model(pipe_dir / "unet", tmp_path / "build", ["fp32"], model_id="refiner",
                                graph_sizes={"text_len": tiny_pipelines.TEXT_LEN})
    shapes = {spec.name: tuple(spec.shape) for spec in load_manifest(build_dir).inputs}
    assert shapes["text_embeds"] == ("batch", 32) and shapes["time_ids"] == ("batch", 5), shapes
    build_engines(build_dir, "ort", "cpu")

    image = torch.rand(2, 3, tiny_pipelines.SIZE, tiny_pipelines.SIZE, generator=torch.Generator().manual_seed(3))

    def call():
        return pipe(["a photo of a cat", "red house"], image=image, strength=0.5, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(7), output_type="latent").images.numpy()

    want = call()
    denoiser = attach_engines(pipe, build_dir, precision="fp32")
    got = call()
    assert len(denoiser.trace.steps) == 2  # strength 0.5 of 4 steps
    assert _relative(got, want) < 1e-4, f"refiner latents differ by {_relative(got, want):.2e}"


def test_time_ids_of_an_sdxl_unet_outside_its_pipeline_must_be_given(tmp_path):
    """A text_time UNet directory alone cannot say whether it takes 6 or 5 time ids: refused by name before anything is
    written; `graph_sizes={"time_ids": 5}` (--time-ids 5) exports it, and a pipeline whose files disagree is refused."""
    import json

    pipe, pipe_dir = _refiner_pipeline_dir(tmp_path)
    alone = tmp_path / "unet"
    pipe.unet.save_pretrained(alone, safe_serialization=True)
    with pytest.raises(TmpdiffError, match="--time-ids"):
        export_model(alone, tmp_path / "out", ["fp32"], graph_sizes={"text_len": 8})
    assert not (tmp_path / "out").exists()
    with pytest.raises(TmpdiffError, match="--time-ids 9: 9 x addition_time_embed_dim 8 leaves no pooled"):
        export_model(alone, tmp_path / "out", ["fp32"], graph_sizes={"text_len": 8, "time_ids": 9})
    assert not (tmp_path / "out").exists()
    build_dir, _ = export_model(alone, tmp_path / "out", ["fp32"], graph_sizes={"text_len": 8, "time_ids": 5})
    assert [tuple(s.shape) for s in load_manifest_inputs(build_dir) if s.name == "time_ids"] == [("batch", 5)]
    index = json.loads((pipe_dir / "model_index.json").read_text())
    (pipe_dir / "model_index.json").write_text(json.dumps(index | {"requires_aesthetics_score": False}))
    with pytest.raises(TmpdiffError, match="disagree"):
        export_model(pipe_dir / "unet", tmp_path / "other", ["fp32"], graph_sizes={"text_len": 8})


def test_time_ids_of_sdxl_as_it_ships_follow_from_its_widths(tmp_path):
    """SDXL's base (2816 = 1280 + 6 x 256) and refiner (2560 = 1280 + 5 x 256) UNets alone: the count that leaves the
    pooled width 1280 is taken; other widths are refused (above)."""
    from tmpdiff.models.unet import resolve_time_ids

    alone = tmp_path / "unet"
    alone.mkdir()
    base = {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 2816,
            "addition_time_embed_dim": 256}
    assert resolve_time_ids(alone, base)["time_ids"] == 6
    assert resolve_time_ids(alone, base | {"projection_class_embeddings_input_dim": 2560})["time_ids"] == 5
    with pytest.raises(TmpdiffError, match="--time-ids"):
        resolve_time_ids(alone, base | {"projection_class_embeddings_input_dim": 2000})


def load_manifest_inputs(build_dir):
    from tmpdiff.formats.manifest import load_manifest

    return load_manifest(build_dir).inputs


def test_a_unet_keeps_the_layers_modelopts_diffusers_example_keeps(tmp_path):
    """Every layer ModelOpt's diffusers example leaves unquantized (its default filter's names) stays high precision in
    a UNet with resnet shortcuts (block widths 32 -> 64): the resnets' time_emb_proj and conv_shortcut among them, while
    attention and resnet convolutions are quantized."""
    import re

    from diffusers import UNet2DConditionModel

    from tmpdiff.export.quantize import build_config, quantize, quantized_modules
    from tmpdiff.formats.precisions import get_precision

    modelopt_kept = re.compile(r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|"
                               r"pos_embed|time_text_embed|context_embedder|norm_out|x_embedder).*")
    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8).eval()
    names = [name for name, _ in model.named_modules()]
    assert any("time_emb_proj" in n for n in names) and any("conv_shortcut" in n for n in names)
    adapter = adapter_for_config(dict(model.config) | {"_class_name": "UNet2DConditionModel", "text_len": 8})
    batch = adapter.sample_inputs(adapter.default_dims(2))
    quantized = quantize(model, build_config(get_precision("int8"), model), [batch],
                         lambda module, inputs: adapter.export_module(module)(*inputs.values()), in_place=True)
    weights, inputs = quantized_modules(quantized)
    assert sorted(n for n in weights | inputs if modelopt_kept.match(n)) == []
    assert any(".attn1.to_q" in n for n in weights & inputs) and any(".resnets.0.conv1" in n for n in weights & inputs)


@pytest.mark.parametrize("extra", [{"time_cond_proj_dim": 16}, {"class_embed_type": "timestep"}])
def test_a_unet_with_an_input_the_graph_would_drop_is_refused_before_anything_is_written(tmp_path, extra):
    """An LCM UNet (time_cond_proj_dim: its pipeline passes timestep_cond) or one with class embeddings: the graph would
    take neither input and so compute another function than the model; export refuses it by name, writing nothing."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra
                         ).save_pretrained(tmp_path / "model", safe_serialization=True)
    with pytest.raises(TmpdiffError, match=f"{next(iter(extra))}=.*is not supported"):
        export_model(tmp_path / "model", tmp_path / "out", ["fp32", "int8"], graph_sizes={"text_len": 8})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["sd3", "flux", "sana", "unet-sd15"])
def test_time_embedding_input_is_refused_by_name_for_other_architectures(tmp_path, name):
    """Learned time embeddings know DiT's per-block embedders and PixArt's adaLN-single only: SD3 and Flux (timestep
    embedded with pooled text), Sana and the UNets are refused naming the architecture, before anything is written,
    and `time_sites` (distill-embeddings) refuses their models the same way instead of probing them with class labels."""
    from tmpdiff.models.time_sites import time_sites

    model = _save(CASES[name], tmp_path / "model")
    architecture = type(model).__name__
    with pytest.raises(TmpdiffError, match=f"not {architecture}"):
        export_model(tmp_path / "model", tmp_path / "out", ["fp32"], time_embedding_input=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TmpdiffError, match=f"not {architecture}"):
        time_sites(model).slots()
