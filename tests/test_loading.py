"""Bad model directories give one clear error naming the path; pickles are never unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest

from tmpdiff.formats.errors import TmpdiffError
from tmpdiff.models.loading import load_diffusers_model


def test_loads_bundled(bundled):
    model = load_diffusers_model(bundled.transformer_dir)
    assert type(model).__name__ == "DiTTransformer2DModel"


def test_missing_dir(tmp_path):
    with pytest.raises(TmpdiffError, match="does not exist") as err:
        load_diffusers_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_not_diffusers_format(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(TmpdiffError, match="no config.json"):
        load_diffusers_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(TmpdiffError, match="no _class_name"):
        load_diffusers_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TmpdiffError, match="not valid JSON"):
        load_diffusers_model(tmp_path)


def test_unknown_class(tmp_path, bundled):
    shutil.copytree(bundled.transformer_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["_class_name"] = "NotAModel"
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(TmpdiffError, match="unknown diffusers model class 'NotAModel'"):
        load_diffusers_model(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, bundled, damage):
    shutil.copytree(bundled.transformer_dir, tmp_path / "m")
    weights = tmp_path / "m/diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    with pytest.raises(TmpdiffError, match="corrupt safetensors") as err:
        load_diffusers_model(tmp_path / "m")
    assert "diffusion_pytorch_model.safetensors" in str(err.value)


def _damaged_header(data: bytes, damage: str) -> bytes:
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    if damage == "length":
        return struct.pack("<Q", 2**62) + data[8:]
    if damage == "list":
        return data[:8] + json.dumps([1]).encode().ljust(size) + data[8 + size:]
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"] = ["x"] if damage == "shape" else [-1]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


@pytest.mark.parametrize("damage", ["length", "list", "shape", "negative"])
def test_corrupt_safetensors_header_refused_by_export(tmp_path, bundled, damage):
    """Export plans its memory from the headers before loading: a header claiming 2**62 bytes, a JSON list, or a
    shape of strings was a MemoryError / AttributeError / ValueError traceback there."""
    from tests.cli_helpers import cli

    shutil.copytree(bundled.transformer_dir, tmp_path / "m")
    weights = tmp_path / "m/diffusion_pytorch_model.safetensors"
    weights.write_bytes(_damaged_header(weights.read_bytes(), damage))
    code, _, err = cli("export", tmp_path / "m", "--out", tmp_path / "out", "--precisions", "fp32")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "diffusion_pytorch_model.safetensors: not a readable safetensors header" in err
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_refused_not_unpickled(tmp_path, bundled):
    shutil.copy(bundled.transformer_dir / "config.json", tmp_path / "config.json")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(TmpdiffError, match="pickle checkpoints"):
        load_diffusers_model(tmp_path)
    assert not marker.exists()


def test_model_identity_leaves_out_where_a_config_was_saved(tmp_path, bundled):
    """A model is its weights and config keys: `_name_or_path` / `_diffusers_version` do not change its hash, another
    key does; a build that recorded the hash of config.json's bytes (before that rule) still matches its model."""
    import hashlib

    from tmpdiff.formats.atomic import sha256_file
    from tmpdiff.formats.manifest import model_content_hash, recorded_model_hash

    model = tmp_path / "model"
    shutil.copytree(bundled.transformer_dir, model)
    before = model_content_hash(model)
    legacy = hashlib.sha256()
    for path in sorted([model / "config.json", *model.glob("*.safetensors")]):
        legacy.update(path.name.encode())
        legacy.update(sha256_file(path).encode())
    assert recorded_model_hash(model, legacy.hexdigest()) == legacy.hexdigest() != before
    assert recorded_model_hash(model, None) == before and recorded_model_hash(model, "0" * 64) == before
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"_name_or_path": "/else", "_diffusers_version": "0.1"}))
    assert model_content_hash(model) == before
    assert recorded_model_hash(model, legacy.hexdigest()) == before  # the bytes changed: no longer the old record
    (model / "config.json").write_text(json.dumps(config | {"num_layers": config["num_layers"] + 1}))
    assert model_content_hash(model) != before


def _tiny_unet(half: bool = True):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8)
    return model.half() if half else model


def test_a_variant_checkpoint_as_it_ships_loads_plans_and_exports(tmp_path):
    """A directory holding only `diffusion_pytorch_model.fp16.safetensors` (or its shards) loads that variant; the
    memory plan counts its parameters once, also when plain weights lie beside it (what diffusers then loads)."""
    import torch

    from tmpdiff.export.exporter import export_model
    from tmpdiff.export.memory_plan import parameter_count
    from tmpdiff.formats.manifest import load_manifest

    model = _tiny_unet()
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "single", safe_serialization=True, variant="fp16")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, variant="fp16", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for name in ("single", "sharded"):
        loaded = load_diffusers_model(tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
        assert parameter_count(tmp_path / name) == parameters, name
    _tiny_unet(half=False).save_pretrained(tmp_path / "single", safe_serialization=True)  # plain fp32 beside it
    assert parameter_count(tmp_path / "single") == parameters
    assert next(load_diffusers_model(tmp_path / "single").parameters()).dtype == torch.float32

    model.register_to_config(text_len=8)
    model.save_pretrained(tmp_path / "variant", safe_serialization=True, variant="fp16")
    build_dir, [outcome] = export_model(tmp_path / "variant", tmp_path / "out", ["fp16"], model_id="v",
                                        load_dtype="float16")
    assert outcome.onnx_path.is_file() and load_manifest(build_dir).precisions["fp16"].reference_dtype == "float16"


def test_several_variants_and_no_plain_weights_are_refused_by_name(tmp_path):
    model = _tiny_unet()
    model.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    model.save_pretrained(tmp_path, safe_serialization=True, variant="bf16")
    with pytest.raises(TmpdiffError, match=r"several kinds \(bf16, fp16\)"):
        load_diffusers_model(tmp_path)


def _variant_pipeline(root):
    """The bundled text-to-image pipeline saved with `variant="fp16"` (fp32 weights, fp16 names) into `root`."""
    from tmpdiff.models.tiny_t2i import t2i_dir
    from tmpdiff.runtime.pipeline_io import load_pipeline

    plain = load_pipeline(t2i_dir(), load_denoiser=True)
    plain.save_pretrained(root, variant="fp16")
    return plain


def _t2i_latents(pipe):
    import torch

    from tmpdiff.models.tiny_t2i import TEXT_LEN
    from tmpdiff.runtime.pipeline_io import call_kwargs, final_latents

    kwargs = call_kwargs(pipe, steps=2, seed=0, guidance_scale=None, text_len=TEXT_LEN, sample_size=8)
    with torch.no_grad():
        return final_latents(pipe, prompt=["a red 3 on a blue background"], **kwargs)


def test_a_pipeline_saved_as_a_variant_loads_that_variant(tmp_path):
    """A pipeline directory whose components hold only `*.fp16.safetensors` (the text encoder's as transformers names
    it) loads with variant="fp16" and samples as the plain one does; a component with plain weights loads them."""
    import torch

    from tmpdiff.models.tiny_t2i import t2i_dir
    from tmpdiff.runtime.pipeline_io import load_pipeline, pipeline_variant

    root = tmp_path / "fp16"
    plain = _variant_pipeline(root)
    assert sorted(p.name for p in root.rglob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"] * 2 + [
        "model.fp16.safetensors"]
    assert pipeline_variant(root) == "fp16" and pipeline_variant(t2i_dir()) is None
    want = _t2i_latents(plain)
    assert torch.equal(_t2i_latents(load_pipeline(root, load_denoiser=True)), want)
    assert load_pipeline(root).transformer is None  # engines will be attached
    vae = root / "vae"
    (vae / "diffusion_pytorch_model.fp16.safetensors").unlink()
    shutil.copy(t2i_dir() / "vae" / "diffusion_pytorch_model.safetensors", vae)  # plain weights in one component
    assert pipeline_variant(root) == "fp16"
    assert torch.equal(_t2i_latents(load_pipeline(root, load_denoiser=True)), want)


def test_a_pipelines_components_of_different_variants_are_refused_by_name(tmp_path):
    """Components holding only variants of different kinds are refused naming the pipeline directory (diffusers takes
    one variant for the whole pipeline); so are plain weights beside the needed variant's (diffusers would load the
    variant there). A denoiser that is not loaded (engines attached) does not count."""
    from tmpdiff.models.tiny_t2i import t2i_dir
    from tmpdiff.runtime.pipeline_io import load_pipeline

    _variant_pipeline(tmp_path)
    encoder, transformer = tmp_path / "text_encoder", tmp_path / "transformer"
    (encoder / "model.fp16.safetensors").rename(encoder / "model.bf16.safetensors")
    with pytest.raises(TmpdiffError, match=r"different kinds \(text_encoder: bf16, transformer: fp16, vae: fp16\)") as err:
        load_pipeline(tmp_path, load_denoiser=True)
    assert str(err.value).startswith(str(tmp_path)) and "\n" not in str(err.value)
    (encoder / "model.bf16.safetensors").rename(encoder / "model.fp16.safetensors")
    shutil.copy(t2i_dir() / "transformer" / "diffusion_pytorch_model.safetensors", transformer)  # plain beside fp16
    with pytest.raises(TmpdiffError, match="holds plain weights beside fp16 ones, and text_encoder, vae only fp16") as err:
        load_pipeline(tmp_path, load_denoiser=True)
    assert str(transformer) in str(err.value)
    assert load_pipeline(tmp_path).transformer is None  # not loaded: its weights are not read
