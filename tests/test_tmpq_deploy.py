"""TMPQ-DM plans executed by `tmpdiff run`: mixed layer configurations deployed as engines of the build, each step
on its configuration's engine at the plan's timestep, and every way a deployment can be missing or stale."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from tests.cli_helpers import cli
from tmpdiff.formats.manifest import load_manifest, mixed_name
from tmpdiff.formats.schedule import SchedulerRef
from tmpdiff.formats.tmpq_plan import TmpqPlan, load_tmpq_plan, save_tmpq_plan
from tmpdiff.models.bundled import sampling_info

TIMESTEPS = [999, 700, 400, 100]


@pytest.fixture(scope="module")
def deployment(quant_build, bundled, tmp_path_factory):
    """A copy of the fully exported build, a 4-step plan with one mixed and one uniform configuration, deployed."""
    from tmpdiff.export.supernet import supernet_from_build

    _, source, _ = quant_build
    build_dir = tmp_path_factory.mktemp("tmpq-deploy") / "tiny-dit"
    shutil.copytree(source, build_dir)
    supernet = supernet_from_build(build_dir, bundled.transformer_dir, ["int8", "int4"])
    cycle = ["int8", "int4", "fp32"]
    mixed = [cycle[i % 3] for i in range(len(supernet.layers))]
    s = sampling_info(bundled)
    plan = TmpqPlan(model_id="tiny-dit", steps=4, timesteps=TIMESTEPS, layers=list(supernet.layers),
                    scheduler=SchedulerRef(class_name=s.scheduler_class, config=dict(s.scheduler_config)),
                    configs=[mixed, ["int8"] * len(mixed)], step_configs=[0, 1, 1, 0])
    path = build_dir.parent / "plan.json"
    save_tmpq_plan(plan, path)
    code, out, err = cli("deploy-plan", build_dir, path)
    assert code == 0, err
    return build_dir, path, plan, supernet, out


def _run(build_dir, plan_path):
    from tmpdiff.commands.run import RunRequest, run

    result, resolved, _ = run(RunRequest(build_dir=build_dir, classes=[2, 5], seed=1, schedule_path=plan_path))
    return result, resolved


def test_deploy_records_the_mixed_configuration_and_keeps_it(deployment):
    build_dir, path, plan, _, out = deployment
    name = mixed_name(plan.layers, plan.configs[0])
    manifest = load_manifest(build_dir)
    assert list(manifest.mixed) == [name] and f"{name}\tdeployed" in out and "int8\tuniform" in out
    entry = manifest.mixed[name]
    assert entry.onnx == f"mixed/{name}/model.onnx" and entry.parity_error < 2e-2
    assert set(entry.sources) == {"int8", "int4"}
    # its TensorRT graph: every int8 / int4 layer's weight through a DequantizeLinear, int8 inputs too, fp16 base
    from tmpdiff.export.census import compute_dtypes
    from tmpdiff.formats.atomic import sha256_file

    assert entry.trt_onnx == f"mixed/{name}/model.trt.onnx" and entry.trt_base == "float16"
    assert sha256_file(build_dir / entry.trt_onnx) == entry.trt_sha256
    counts = {p: entry.precisions.count(p) for p in ("int8", "int4", "fp32")}
    assert entry.census["weight_quantized"] == counts["int8"] + counts["int4"]
    assert entry.census["input_quantized"] == counts["int8"]
    assert entry.trt_parity_error is None  # int4's trt::DequantizeLinear: ONNX Runtime cannot run the graph
    dtypes = compute_dtypes(onnx.load(str(build_dir / entry.trt_onnx)))
    assert dtypes["MatMul"].get("float16", 0) > 0 and "float32" not in dtypes["Softmax"]
    # `build --backend trt --print-command` builds it too (no TensorRT needed to print the commands)
    code, out, err = cli("build", build_dir, "--backend", "trt", "--print-command")
    assert code == 0, err
    assert f"--onnx={build_dir / entry.trt_onnx}" in out and f"--import-plan {name}=" in out
    assert json.loads((build_dir / "manifest.json").read_text())["format"] == "tmpdiff.manifest/3"
    code, again, _ = cli("deploy-plan", build_dir, path)
    assert code == 0 and f"{name}\tup to date" in again
    assert cli("check", build_dir, "--schedule", path)[0] == 0


def test_run_executes_each_step_on_its_configurations_engine(deployment, bundled):
    from tmpdiff.calibration.tmpq_eval import ConfigEngine
    from tmpdiff.models.registry import adapter_for_config
    from tmpdiff.models.schedulers import sampling_scheduler
    from tmpdiff.runtime.runner import ScheduledRunner, initial_noise

    build_dir, path, plan, supernet, _ = deployment
    result, resolved = _run(build_dir, path)
    name = mixed_name(plan.layers, plan.configs[0])
    assert [e.precision for e in result.trace.steps] == [name, "int8", "int8", name]
    assert [e.timestep for e in result.trace.steps] == TIMESTEPS
    # the same plan on the super-network in torch (what the search evaluated)
    s = sampling_info(bundled)
    adapter = adapter_for_config(load_manifest(build_dir).denoiser_config)
    engines = {f"c{i}": ConfigEngine(supernet, c, adapter, f"c{i}") for i, c in enumerate(plan.configs)}
    runner = ScheduledRunner(engines, 2, s.channels, s.image_size, s.guidance_scale, s.null_class, s.num_classes,
                             nan_guard=False)
    want = runner.sample(sampling_scheduler(s), torch.tensor([2, 5]), initial_noise(2, s.channels, s.image_size, 1),
                         ["c0", "c1", "c1", "c0"], timesteps=TIMESTEPS).latents
    assert (result.latents - want).norm() / want.norm() < 2e-2
    # the mixed configuration is what runs: uniform int8 at the same timesteps gives other latents
    uniform = runner.sample(sampling_scheduler(s), torch.tensor([2, 5]), initial_noise(2, s.channels, s.image_size, 1),
                            ["c1"] * 4, timesteps=TIMESTEPS).latents
    assert (result.latents - uniform).norm() > 5 * (result.latents - want).norm()


def test_missing_or_stale_deployments_are_refused_by_name(deployment, tmp_path):
    build_dir, path, plan, _, _ = deployment
    name = mixed_name(plan.layers, plan.configs[0])
    copy = tmp_path / "tiny-dit"
    shutil.copytree(build_dir, copy)
    graph = copy / "mixed" / name / "model.onnx"
    original = graph.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    code, out, _ = cli("check", copy)
    assert code != 0 and name in out and "sha256" in out
    code, _, err = cli("run", copy, "--schedule", path, "--class", "1", "--out", tmp_path / "a.png")
    assert code == 2 and name in err and "deploy-plan" in err and not (tmp_path / "a.png").exists()
    # a re-export of a precision it was made from makes it stale
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    graph.write_bytes(original)
    manifest["mixed"][name]["sources"]["int4"] = "an older export key"
    manifest_path.write_text(json.dumps(manifest))
    code, _, err = cli("run", copy, "--schedule", path, "--class", "1", "--out", tmp_path / "b.png")
    assert code == 2 and "older export of int4" in err
    # not deployed at all; on TensorRT (the drop-in inside a pipeline: tests/test_tmpq_t2i.py)
    del manifest["mixed"]
    manifest["format"] = "tmpdiff.manifest/2"
    manifest_path.write_text(json.dumps(manifest))
    code, out, _ = cli("check", copy, "--schedule", path)
    assert code != 0 and "not deployed" in out and "deploy-plan" in out
    code, _, err = cli("run", build_dir, "--schedule", path, "--class", "1", "--backend", "trt", "--out",
                       tmp_path / "c.png")
    assert code == 2 and "no trt engine is built for cuda: run `tmpdiff build" in err  # mixed plans build like any


def test_a_plan_for_another_build_is_refused(deployment, tmp_path):
    build_dir, path, plan, _, _ = deployment
    other = tmp_path / "plan.json"
    save_tmpq_plan(plan.model_copy(update={"model_id": "another-model"}), other)
    code, _, err = cli("deploy-plan", build_dir, other)
    assert code == 2 and "another-model" in err
    code, _, err = cli("run", build_dir, "--schedule", other, "--class", "1", "--out", tmp_path / "o.png")  # run too
    assert code == 2 and "the plan was searched on 'another-model'" in err and str(other) in err, err
    code, out, _ = cli("check", build_dir, "--schedule", other)
    assert code == 1 and "another-model" in out, out
    # the same model id, other weights (or a precision it uses exported again): only a /2 plan's record can tell
    manifest = load_manifest(build_dir)
    keys = {p: manifest.precisions[p].key for p in ("int8", "int4")}
    ours = plan.model_copy(update={"model_sha256": manifest.model_sha256, "export_keys": keys})
    assert ours.build_problem(manifest) is None
    for update, message in (({"model_sha256": "0" * 64}, "searched on another 'tiny-dit'"),
                            ({"export_keys": keys | {"int4": "an earlier export"}}, "int4 was exported again")):
        elsewhere = tmp_path / "elsewhere.json"
        save_tmpq_plan(ours.model_copy(update=update), elsewhere)
        assert json.loads(elsewhere.read_text())["format"] == "tmpdiff.tmpq-plan/2"
        for command in (["deploy-plan", build_dir, elsewhere],
                        ["run", build_dir, "--schedule", elsewhere, "--class", "1", "--out", tmp_path / "o.png"]):
            code, _, err = cli(*command)
            assert code == 2 and message in err, err
        code, out, _ = cli("check", build_dir, "--schedule", elsewhere)
        assert code == 1 and message in out, out
    fewer = tmp_path / "fewer.json"
    save_tmpq_plan(plan.model_copy(update={"layers": plan.layers[:-1], "configs": [c[:-1] for c in plan.configs]}),
                   fewer)
    code, _, err = cli("deploy-plan", build_dir, fewer)
    assert code == 2 and "layers" in err


def test_a_build_of_another_model_needs_model_named(deployment, tmp_path):
    """Without --model, deploy-plan and layer-costs take the bundled model the build's manifest records by hash; a
    build of any other model is told to name it (the manifest holds its hash, not its place)."""
    from tmpdiff.commands.search_plan import build_model
    from tmpdiff.formats.manifest import load_manifest, save_manifest

    build_dir, path, _, _, _ = deployment
    assert build_model(build_dir, None) == "bundled" and build_model(build_dir, "elsewhere") == "elsewhere"
    other = tmp_path / "other"
    other.mkdir()
    save_manifest(other, load_manifest(build_dir).model_copy(update={"model_sha256": "0" * 64}))
    for command in (["deploy-plan", other, path], ["layer-costs", other, "--out", tmp_path / "costs.json"]):
        code, _, err = cli(*command)
        assert code == 2 and "not exported from a bundled model (its model id is 'tiny-dit')" in err, err
        assert "pass --model" in err and str(other / "manifest.json") in err
    assert not (tmp_path / "costs.json").exists()


def test_mixed_configurations_need_a_build_that_takes_the_timestep(deployment, tmp_path):
    """A build exported with --time-embedding-input runs no mixed layer configuration (their graphs take the
    timestep): deploy-plan refuses the plan, check names a configuration deployed there, run does not start."""
    from tmpdiff.formats.manifest import TimeEmbeddingInputEntry, load_manifest, save_manifest

    build_dir, path, _, _, _ = deployment
    copy = tmp_path / "tiny-dit"
    shutil.copytree(build_dir, copy)
    manifest = load_manifest(copy)
    manifest.time_embedding_input = TimeEmbeddingInputEntry(input="time_embeddings", slots=["a"], dim=4,
                                                            train_timesteps=1000, own_table="own.safetensors",
                                                            sha256="0" * 64)
    save_manifest(copy, manifest)
    code, _, err = cli("deploy-plan", copy, path)
    assert code == 2 and "take time embeddings (--time-embedding-input)" in err and "manifest.json" in err, err
    code, out, _ = cli("check", copy, "--schedule", path)
    assert code == 1 and "deployed on a build whose graphs take time embeddings" in out, out
    code, _, err = cli("run", copy, "--schedule", path, "--class", "1", "--out", tmp_path / "o.png")
    assert code == 2 and "TMPQ-DM plans run on a build exported without --time-embedding-input" in err, err


def test_a_configuration_too_large_for_inline_graphs_is_refused(deployment, monkeypatch):
    """A layer configuration records two graph files and their hashes: graphs that would need external data are
    refused by name (onnx.save failed on them past 2 GB with a protobuf traceback), and the manifest is unchanged."""
    build_dir, _, plan, _, _ = deployment
    other = plan.model_copy(update={"configs": [list(reversed(plan.configs[0])), plan.configs[1]]})
    path = build_dir.parent / "plan-large.json"
    save_tmpq_plan(other, path)
    before = (build_dir / "manifest.json").read_bytes()
    monkeypatch.setenv("TMPDIFF_EXTERNAL_DATA_BYTES", "4096")
    code, _, err = cli("deploy-plan", build_dir, path)
    assert code == 2 and "not supported yet" in err and "GB of weights" in err, err
    assert (build_dir / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (build_dir / "mixed").iterdir()) == list(load_manifest(build_dir).mixed)


def test_a_build_made_from_a_16_bit_model_deploys_its_mixed_configurations(bundled, tmp_path):
    """`export --load-dtype float16` (what a model too large for fp32 gets): the super-network is that 16-bit model,
    as the engines were exported from it (it was loaded in fp32), and its mixed graph is made as a uniform export
    from 16 bits is (convolutions traced in fp32, int8 Q/DQ in the model's dtype, int8 / int4 twins computing in fp32
    outside their quantized weights): it was refused by torch before (an fp32 input met fp16 weights)."""
    from tmpdiff.export.supernet import supernet_from_build

    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "int8,int4",
                       "--load-dtype", "float16", "--model-id", "half", "--calib-seeds", "0")
    assert code == 0, err
    build_dir = tmp_path / "half"
    supernet = supernet_from_build(build_dir, bundled.transformer_dir, ["int8", "int4"])
    assert next(supernet.model.parameters()).dtype == torch.float16
    cycle = ["int8", "int4", "fp32"]
    mixed = [cycle[i % 3] for i in range(len(supernet.layers))]
    int8_mixed = ["int8" if i % 2 else "fp32" for i in range(len(supernet.layers))]  # Half Q/DQ, as uniform int8's
    s = sampling_info(bundled)
    plan = TmpqPlan(model_id="half", steps=4, timesteps=TIMESTEPS, layers=list(supernet.layers),
                    scheduler=SchedulerRef(class_name=s.scheduler_class, config=dict(s.scheduler_config)),
                    configs=[mixed, int8_mixed], step_configs=[0, 1, 1, 0])
    path = tmp_path / "plan.json"
    save_tmpq_plan(plan, path)
    code, out, err = cli("deploy-plan", build_dir, path, "--model", bundled.transformer_dir)
    assert code == 0, out + err
    for config in (mixed, int8_mixed):
        entry = load_manifest(build_dir).mixed[mixed_name(plan.layers, config)]
        print(f"mixed twin vs the 16-bit super-network: {entry.parity_error:.2e}, its TensorRT graph "
              f"{entry.trt_parity_error}")
        assert entry.parity_error < 1e-2  # and within the twins' rule, which deploy-plan checked
        twin = onnx.load(build_dir / entry.onnx)
        assert onnx.TensorProto.FLOAT16 not in {t.data_type for t in twin.graph.initializer}
        trt = onnx.load(build_dir / entry.trt_onnx)
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in trt.graph.initializer}
    # fp32 (the layer costs' base) can only be made from an fp32 load: exported beside them, as a user would
    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp32", "--model-id",
                       "half")
    assert code == 0, err
    code, _, err = cli("build", build_dir, "--threads", 1)
    assert code == 0, err
    result, _ = _run(build_dir, path)
    assert torch.isfinite(result.latents).all()

    # the search side runs the 16-bit super-network in torch too: its MAC count (layer costs) and its candidates'
    # engines, whose output is the deployed twin's
    from tmpdiff.calibration.tmpq import measure_layer_costs
    from tmpdiff.calibration.tmpq_eval import ConfigEngine
    from tmpdiff.models.registry import adapter_for_config

    table = measure_layer_costs(build_dir, bundled.transformer_dir, ["int8", "int4"], batch=2, warmup=0, repeats=1,
                                threads=1)
    assert table.names == supernet.layers and all(layer.macs > 0 for layer in table.layers)
    adapter = adapter_for_config(load_manifest(build_dir).denoiser_config)
    inputs = adapter.sample_inputs(adapter.default_dims(2), seed=3)
    out = {s.name: torch.zeros(s.concrete(adapter.default_dims(2))) for s in adapter.output_specs()}
    engine = ConfigEngine(supernet, int8_mixed, adapter, "config")
    engine.bind(inputs, out)
    engine.run(None)
    import onnxruntime as ort

    entry = load_manifest(build_dir).mixed[mixed_name(plan.layers, int8_mixed)]
    twin = ort.InferenceSession(str(build_dir / entry.onnx), providers=["CPUExecutionProvider"])
    [want] = twin.run(None, {k: v.numpy() for k, v in inputs.items()})
    got = next(iter(out.values())).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def _scaled_input_scale(layer: int, factor: float):
    """`graph_rewrite.ort_twin` with the `layer`-th int8 layer's activation scale (its input Q/DQ's) multiplied by
    `factor`: a damage that moves only the quantization grid, so the output moves by quantization noise."""
    from onnx import numpy_helper

    from tmpdiff.export.graph_rewrite import ort_twin

    def damaged(*args, **kwargs):
        twin, stats = ort_twin(*args, **kwargs)
        node = [n for n in twin.graph.node if n.op_type == "QuantizeLinear" and "/int8/input_quantizer/" in n.name][layer]
        constant = next(n for n in twin.graph.node if n.op_type == "Constant" and n.output[0] == node.input[1])
        value = next(a for a in constant.attribute if a.name == "value")
        scale = numpy_helper.to_array(value.t)
        value.t.CopyFrom(numpy_helper.from_array((scale * factor).astype(scale.dtype), value.t.name))
        return twin, stats

    return damaged


def test_a_mixed_layer_quantized_unlike_its_uniform_export_is_refused(deployment, monkeypatch, tmp_path):
    """One int8 layer's activation scale x1.5 among twelve int8 layers moves the output by quantization noise only:
    the parity rule, relative to the configuration's whole quantization error, passes such a twin (on one export,
    22 of 24 single-layer damages x1.5 or x0.67; which ones depends on the export), while compared layer by layer
    with the build's uniform int8 twin every one is refused."""
    import tmpdiff.export.mixed as mixed
    from tmpdiff.formats.errors import TmpdiffError
    from tmpdiff.models.registry import adapter_for_config

    build_dir, _, plan, supernet, _ = deployment
    adapter = adapter_for_config(load_manifest(build_dir).denoiser_config)
    config = ["int8" if i % 2 else "fp32" for i in range(len(plan.layers))]
    uniform = {"int8": build_dir / load_manifest(build_dir).precisions["int8"].onnx}
    honest = mixed.export_mixed(supernet, config, adapter, tmp_path / "honest", uniform_twins=uniform)
    passed_parity = []
    for layer in (6, 7, 10, 11):
        monkeypatch.setattr(mixed, "ort_twin", _scaled_input_scale(layer, 1.5))
        with pytest.raises(TmpdiffError, match=r"/int8/input_quantizer/QuantizeLinear differs from the uniform "
                                               r"int8 twin's \(input 1 values up to 0.5 apart"):
            mixed.export_mixed(supernet, config, adapter, tmp_path / "checked", uniform_twins=uniform)
        assert not (tmp_path / "checked" / "model.onnx").exists()
        try:  # the parity rule alone (no uniform twins given)
            damaged = mixed.export_mixed(supernet, config, adapter, tmp_path / f"parity-only-{layer}")
            passed_parity.append((layer, damaged.parity_error))
        except TmpdiffError:
            pass
    print(f"parity: honest {honest.parity_error:.2e}; damaged twins the parity rule passed: {passed_parity}")
    assert passed_parity and all(error > honest.parity_error for _, error in passed_parity)
    with pytest.raises(TmpdiffError, match="no uniform twin given for int8"):
        mixed.export_mixed(supernet, config, adapter, tmp_path / "checked", uniform_twins={"int4": uniform["int8"]})


def test_check_compares_a_deployments_layers_with_the_uniform_twins(deployment, tmp_path):
    """A deployment whose recorded hash is its file's but whose layer is quantized unlike the uniform export (made
    before deploy-plan compared them, or edited and re-hashed): `check` names the layer."""
    from onnx import numpy_helper

    from tmpdiff.formats.atomic import sha256_file
    from tmpdiff.formats.manifest import save_manifest

    build_dir, _, plan, _, _ = deployment
    name = mixed_name(plan.layers, plan.configs[0])
    copy = tmp_path / "tiny-dit"
    shutil.copytree(build_dir, copy)
    assert cli("check", copy)[0] == 0
    graph_path = copy / "mixed" / name / "model.onnx"
    graph = onnx.load(graph_path)
    node = next(n for n in graph.graph.node if n.op_type == "QuantizeLinear" and "/int8/input_quantizer/" in n.name)
    value = next(a for n in graph.graph.node if n.op_type == "Constant" and n.output[0] == node.input[1]
                 for a in n.attribute if a.name == "value")
    value.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value.t) * np.float32(1.5), value.t.name))
    onnx.save(graph, graph_path)
    manifest = load_manifest(copy)
    manifest.mixed[name] = manifest.mixed[name].model_copy(update={"sha256": sha256_file(graph_path)})
    save_manifest(copy, manifest)
    code, out, _ = cli("check", copy)
    assert code != 0 and name in out and f"{node.name} differs from the uniform int8 twin's (input 1 values" in out, out
    # a uniform twin missing is the precision's own problem (re-export), not a comparison that cannot run
    (copy / "int8" / "model.onnx").unlink()
    code, out, err = cli("check", copy)
    assert code != 0 and "int8: file is missing" in out and "Traceback" not in out + err, out + err


def _without_segment(name: str) -> str:
    return name.replace("/int8/", "/", 1)


def _damages():
    """(what, damage of a mixed twin proto, refusal) for `check_layers_match_uniform`."""
    from onnx import numpy_helper

    def constant(model, name):
        inits = {t.name: t for t in model.graph.initializer}
        if name in inits:
            return inits[name]
        return next(a.t for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name
                    for a in n.attribute if a.name == "value")

    def scale(model, node_part, slot, change):
        node = next(n for n in model.graph.node if node_part in n.name and n.op_type in ("QuantizeLinear",
                                                                                         "DequantizeLinear", "Mul"))
        tensor = constant(model, node.input[slot])
        value = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(change(value)).astype(value.dtype), tensor.name))

    def rename(model):
        node = next(n for n in model.graph.node if "/int8/input_quantizer/QuantizeLinear" in n.name)
        node.name = _without_segment(node.name)

    def remove(model):
        doomed = [n for n in model.graph.node if "/int8/input_quantizer/" in n.name and n.op_type != "Constant"][:2]
        for node in doomed:
            model.graph.node.remove(node)

    return [
        ("renamed", rename, "in no quantized layer's scope"),
        ("removed", remove, "has no counterpart in this layer"),
        ("weight zero point", lambda m: scale(m, "/int8/weight_quantizer/", 2, lambda v: v + 1), r"\(zero point\)"),
        ("awq scale", lambda m: scale(m, "/int4/input_quantizer/Mul", 1, lambda v: v * 1.5), "values up to 0.5"),
        ("fp16 step", lambda m: scale(m, "/int8/input_quantizer/QuantizeLinear", 1, lambda v: v * (1 + 2 ** -12)),
         "values up to"),
    ]


@pytest.mark.parametrize("damage", _damages(), ids=lambda d: d[0])
def test_the_layer_check_refuses_each_kind_of_damage(deployment, damage):
    """Static: the deployed int8 + int4 + fp32 twin, damaged one way, against the build's uniform twins. An fp16 step
    of a scale passes only on a 16-bit host's allowance."""
    from tmpdiff.export.twin_match import check_layers_match_uniform
    from tmpdiff.formats.errors import TmpdiffError

    build_dir, _, plan, _, _ = deployment
    manifest = load_manifest(build_dir)
    entry = manifest.mixed[mixed_name(plan.layers, plan.configs[0])]
    uniform = {p: build_dir / manifest.precisions[p].onnx for p in ("int8", "int4")}
    layers = {p: entry.precisions.count(p) for p in uniform}
    honest = onnx.load(build_dir / entry.onnx)
    assert check_layers_match_uniform(honest, uniform, layers, build_dir / entry.onnx) > 0
    with pytest.raises(TmpdiffError, match="8 int8 layers have quantizer nodes, the configuration has 9"):
        check_layers_match_uniform(honest, uniform, layers | {"int8": 9}, build_dir / entry.onnx)
    what, damage, refusal = damage
    damage(honest)
    with pytest.raises(TmpdiffError, match=refusal):
        check_layers_match_uniform(honest, uniform, layers, build_dir / entry.onnx)
    if what == "fp16 step":
        assert check_layers_match_uniform(honest, uniform, layers, build_dir / entry.onnx, tolerant=True) > 0


def test_a_16_bit_build_measures_searches_and_runs_its_unquantized_layers_on_the_fp16_engine(bundled, tmp_path):
    """A build exported from a 16-bit model with fp16 as its unquantized precision (a GPU build's usual case; it has
    no fp32 engine): layer-costs measures the unquantized layers on the fp16 engine, the search reads that column as
    the super-network's unquantized ("fp32") alternative, the plan records the engine, and a step of the all-
    unquantized configuration runs on it (was: layer-costs and the search refused for want of an fp32 engine)."""
    from tmpdiff.formats.layer_costs import load_layer_costs

    code, _, err = cli("export", bundled.transformer_dir, "--out", tmp_path, "--precisions", "fp16,int8",
                       "--load-dtype", "float16", "--model-id", "half16", "--calib-seeds", "0")
    assert code == 0, err
    build_dir = tmp_path / "half16"
    assert cli("build", build_dir, "--threads", 1)[0] == 0
    costs = tmp_path / "layer_costs.json"
    code, _, err = cli("layer-costs", build_dir, "--model", bundled.transformer_dir, "--out", costs, "--batch", 2,
                       "--warmup", 0, "--repeats", 2, "--threads", 1)
    assert code == 0, err
    table = load_layer_costs(costs)
    assert table.precisions == ["fp16", "int8"] and table.base == "fp16" and table.unquantized_engine is None
    view = table.unquantized_as("fp16")
    assert view.precisions == ["fp32", "int8"] and view.config_ms(view.uniform("fp32")) == table.config_ms(
        table.uniform("fp16"))
    assert view.config_bitops(view.uniform("fp32")) == table.config_bitops(table.uniform("fp16"))  # 16-bit widths
    plan_path = tmp_path / "plan.json"
    code, out, err = cli("search-plan", build_dir, "--model", "bundled", "--layer-costs", costs,
                         "--steps", 3, "--reference-steps", 4, "--speedup", 1.2, "--generations", 1, "--population", 2,
                         "--calib-seeds", 0, "--holdout-seeds", 1000, "--out", plan_path)
    assert code == 0, out + err
    plan = load_tmpq_plan(plan_path)
    assert plan.unquantized_engine == "fp16" and plan.reference["precision"] == "fp16"
    # naming fp16 among the choices means the unquantized alternative there (was: "the table has no fp16")
    code, out, err = cli("search-plan", build_dir, "--model", "bundled", "--layer-costs", costs, "--precisions",
                         "fp16,int8", "--steps", 3, "--reference-steps", 4, "--speedup", 1.2, "--generations", 1,
                         "--population", 2, "--calib-seeds", 0, "--holdout-seeds", 1000, "--out", tmp_path / "p2.json")
    assert code == 0, out + err
    assert load_tmpq_plan(tmp_path / "p2.json").search["precisions"] == ["fp32", "int8"]
    assert "fp16 4 steps (reference)" in plan.measured["holdout"]["results"]
    code, out, err = cli("deploy-plan", build_dir, plan_path, "--model", bundled.transformer_dir)
    assert code == 0, out + err
    result, _ = _run(build_dir, plan_path)
    assert torch.isfinite(result.latents).all()
    # the all-unquantized configuration runs on the fp16 engine: the plan's steps as fp16 steps, bit for bit
    unquantized = plan.model_copy(update={"configs": [["fp32"] * len(plan.layers)], "step_configs": [0] * plan.steps})
    save_tmpq_plan(unquantized, tmp_path / "unquantized.json")
    result, _ = _run(build_dir, tmp_path / "unquantized.json")
    assert [s.precision for s in result.trace.steps] == ["fp16"] * plan.steps
    schedule = tmp_path / "fp16.json"
    schedule.write_text(json.dumps({"format": "tmpdiff.schedule/2", "steps": plan.steps, "precisions": ["fp16"] * plan.steps,
                                    "timesteps": plan.timesteps, "scheduler": plan.scheduler.model_dump(mode="json")}))
    want, _ = _run(build_dir, schedule)
    assert torch.equal(result.latents, want.latents)
