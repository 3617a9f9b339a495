"""The package stage end to end on the shipped model (ONNX Runtime, CPU), Triton's schema on the
config it writes, and a TensorRT recipe on a machine without a GPU: it stops before the engine
and keeps every earlier artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.errors import RecipeError, ResourceError
from pipeline.gpu import GpuFingerprint, detect_gpu
from pipeline.hashing import sha256_file

from .conftest import ROOT, SHIPPED_MODEL

pytestmark = pytest.mark.slow
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] for Triton's schema")

NO_GPU = GpuFingerprint(present=False, reason="nvidia-smi not found: no NVIDIA driver")
VERIFY = """verify:
  greedy_tokens: 8
  eval_windows: 1
  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}
"""
ORT_RECIPE = f"""schema_version: 1
name: tiny-triton
model: {{path: {SHIPPED_MODEL}}}
stages:
  - type: export
    opset: 23
  - type: simplify
  - type: engine
    intra_op_threads: 1
  - type: package
    model_name: tiny-llama
    max_batch_size: 4
    dynamic_batching: {{max_queue_delay_microseconds: 100, preferred_batch_size: [2, 4]}}
    instance_count: 2
{VERIFY}"""
TRT_RECIPE = f"""schema_version: 1
name: tiny-trt
model: {{path: {SHIPPED_MODEL}}}
stages:
  - type: export
    opset: 23
  - type: simplify
  - type: precision
    mode: int8-qdq
    target: tensorrt
    calibration: {{samples: 4, seq_len: 32}}
  - type: engine
    backend: tensorrt
    profiles:
      - name: prefill
        axes:
          batch: {{min: 1, opt: 1, max: 2}}
          sequence: {{min: 1, opt: 16, max: 64}}
          past_sequence: {{min: 0, opt: 0, max: 0}}
      - name: decode
        axes:
          batch: {{min: 1, opt: 1, max: 4}}
          sequence: {{min: 1, opt: 1, max: 1}}
          past_sequence: {{min: 1, opt: 32, max: 127}}
  - type: package
{VERIFY}"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One ORT run with a package, then a TensorRT recipe in the same cache on a machine without GPU."""
    root = tmp_path_factory.mktemp("package")
    cache = root / "cache"
    (root / "ort.yaml").write_text(ORT_RECIPE)
    (root / "trt.yaml").write_text(TRT_RECIPE)
    ort = Pipeline.from_recipe(root / "ort.yaml", cache_dir=cache).run()
    with pytest.raises(ResourceError) as stopped:
        Pipeline.from_recipe(root / "trt.yaml", cache_dir=cache, gpu_probe=lambda: NO_GPU).run()
    return {"root": root, "cache": cache, "ort": ort, "stopped": stopped.value}


def _model_dir(result) -> Path:
    return Path(result.stage("package").artifact) / "tiny-llama"


def test_package_writes_a_triton_repository_valid_under_tritons_schema(runs):
    import onnx

    from pipeline.triton import parse_config

    result = runs["ort"]
    assert result.ok and result.stage("package").verify["metrics"]["schema_checked"]
    folder = _model_dir(result)
    config = parse_config((folder / "config.pbtxt").read_text())
    assert (config.name, config.platform, config.backend) == ("tiny-llama", "onnxruntime_onnx", "onnxruntime")
    graph = onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    dims = {i.name: list(i.dims) for i in list(config.input) + list(config.output)}
    assert config.max_batch_size == 4  # the batch axis is Triton's, so dims leave it out
    assert dims["input_ids"] == [-1] and dims["attention_mask"] == [-1]
    assert dims["past_key_values.0.key"] == [2, -1, 32] and dims["logits"][0] == -1
    types = {i.name: mc.DataType.Name(i.data_type) for i in config.input}
    assert types["input_ids"] == "TYPE_INT64" and types["past_key_values.1.value"] == "TYPE_FP32"
    group = config.instance_group[0]
    assert mc.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU" and group.count == 2
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.optimization.graph.level == 2  # the engine is optimized already: ORT_DISABLE_ALL
    assert config.parameters["intra_op_thread_count"].string_value == "1"


def test_packaged_model_opens_in_onnx_runtime_with_the_configs_names_and_types(runs):
    import onnxruntime as ort

    from pipeline.triton import parse_config

    folder = _model_dir(runs["ort"])
    config = parse_config((folder / "config.pbtxt").read_text())
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ort_types = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}
    assert [(i.name, ort_types[i.type]) for i in session.get_inputs()] == \
        [(i.name, mc.DataType.Name(i.data_type)) for i in config.input]
    assert [len(i.shape) - 1 for i in session.get_inputs()] == [len(i.dims) for i in config.input]


def test_manifest_lists_every_file_the_recipe_target_and_verification(runs):
    result = runs["ort"]
    folder = _model_dir(result)
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for rel, info in manifest["files"].items():
        assert sha256_file(folder / rel) == info["sha256"]
    engine = Path(result.stage("engine").artifact)
    assert manifest["files"]["1/model.onnx"]["sha256"] == sha256_file(engine)
    assert manifest["recipe"]["sha256"] == sha256_file(runs["root"] / "ort.yaml")
    assert manifest["target"]["runtime"] == "onnxruntime" and manifest["target"]["cpu"]["kind"] == "cpu"
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert list(stages) == ["load", "export", "simplify", "engine"]
    assert all(s["verify"]["passed"] for s in stages.values())
    assert stages["engine"]["verify"]["metrics"]["greedy_tokens_matched"] == 8
    assert stages["engine"]["key"] == result.stage("engine").key
    from pipeline.recipe import Recipe, load_recipe  # the resolved recipe reads back to the same thresholds

    resolved, loaded = Recipe.model_validate(manifest["recipe"]["resolved"]), load_recipe(runs["root"] / "ort.yaml")
    assert all(resolved.policy_for(s) == loaded.recipe.policy_for(s) for s in ("export", "simplify", "engine"))
    assert stages["engine"]["verify"]["thresholds"] == loaded.recipe.policy_for("engine").to_dict()


def test_second_run_is_all_hits(runs):
    again = Pipeline.from_recipe(runs["root"] / "ort.yaml", cache_dir=runs["cache"]).run()
    assert [s.cached for s in again.stages] == [True] * 5


def test_schema_rejects_a_config_triton_would_reject():
    from google.protobuf import text_format

    from pipeline.triton import parse_config

    with pytest.raises(text_format.ParseError):
        parse_config('name: "m"\nmax_batch_sizes: 4\n')
    with pytest.raises(text_format.ParseError):
        parse_config('name: "m"\ninput [ { name: "x" data_type: TYPE_FLOAT32 dims: [ -1 ] } ]\n')


def test_tensorrt_config_uses_gpu_instances_and_every_profile():
    from pipeline.tensorrt.profiles import GraphInput
    from pipeline.triton import TritonModel, parse_config, render_config, triton_tensors

    inputs = [GraphInput("input_ids", ("batch", "sequence"), "INT64"),
              GraphInput("past_key_values.0.key", ("batch", 2, "past_sequence", 32), "FLOAT16")]
    outputs = [GraphInput("logits", ("batch", "sequence", 2048), "FLOAT")]
    model = TritonModel(name="m", backend="tensorrt", max_batch_size=0, inputs=triton_tensors(inputs, 0),
                        outputs=triton_tensors(outputs, 0), profiles=("0", "1"))
    config = parse_config(render_config(model))
    assert (config.platform, config.backend, config.max_batch_size) == ("tensorrt_plan", "tensorrt", 0)
    assert list(config.input[1].dims) == [-1, 2, -1, 32] and list(config.output[0].dims) == [-1, -1, 2048]
    assert mc.DataType.Name(config.input[1].data_type) == "TYPE_FP16"
    assert mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert list(config.instance_group[0].profile) == ["0", "1"]
    assert not config.HasField("dynamic_batching")


def test_python_backend_config_names_the_engine_file_and_no_platform():
    from pipeline.tensorrt.profiles import GraphInput
    from pipeline.triton import TritonModel, parse_config, render_config, triton_tensors

    inputs = [GraphInput("input_ids", ("batch", "sequence"), "INT64")]
    outputs = [GraphInput("logits", ("batch", "sequence", 64), "FLOAT")]
    model = TritonModel(name="m", backend="onnxruntime", max_batch_size=4, inputs=triton_tensors(inputs, 4),
                        outputs=triton_tensors(outputs, 4), graph_level=2, server_backend="python",
                        parameters={"intra_op_thread_count": "2", "execution_mode": "0"})
    config = parse_config(render_config(model))
    assert (config.platform, config.backend) == ("", "python")
    assert not config.HasField("optimization")  # the onnxruntime backend's setting; model.py opens it unoptimized
    assert {k: v.string_value for k, v in config.parameters.items()} == {"model_file": "model.onnx",
                                                                         "intra_op_thread_count": "2"}
    assert mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"


def test_batching_needs_the_batch_axis_first():
    from pipeline.tensorrt.profiles import GraphInput
    from pipeline.triton import triton_tensors

    with pytest.raises(RecipeError, match="needs the 'batch' axis first.*set max_batch_size: 0"):
        triton_tensors([GraphInput("x", ("sequence", "batch"), "FLOAT")], 4)


# ---- TensorRT recipe on a machine without a GPU ----------------------------------------
def test_tensorrt_recipe_stops_before_the_engine_and_keeps_earlier_artifacts(runs):
    message = str(runs["stopped"])
    assert "stage 'engine' (backend tensorrt) needs an NVIDIA GPU" in message
    assert "nvidia-smi not found" in message and "--until precision" in message
    assert runs["stopped"].exit_code == 2
    planned = {p.name: p for p in Pipeline.from_recipe(runs["root"] / "trt.yaml", cache_dir=runs["cache"],
                                                       gpu_probe=lambda: NO_GPU).plan()}
    assert [planned[n].status for n in ("load", "export", "simplify", "precision")] == ["hit"] * 4
    assert planned["engine"].status == "miss" and "cannot build here" in planned["engine"].detail
    report = json.loads(next(p for p in sorted((runs["cache"] / "runs").glob("*tiny-trt/report.json"))).read_text())
    assert report["status"] == "failed" and [s["name"] for s in report["stages"]][-1] == "precision"


def test_profiles_derived_from_the_real_lowered_graph(runs):
    from pipeline.recipe import load_recipe
    from pipeline.tensorrt.build import loader_chain, settings_from_spec
    from pipeline.tensorrt.profiles import derive_profiles, graph_inputs, to_polygraphy

    from .test_tensorrt import fake_trt

    planned = {p.name: p for p in Pipeline.from_recipe(runs["root"] / "trt.yaml", cache_dir=runs["cache"],
                                                       gpu_probe=lambda: NO_GPU).plan()}
    model = runs["cache"] / planned["precision"].key[:2] / planned["precision"].key / "model.onnx"
    spec = load_recipe(runs["root"] / "trt.yaml").recipe.stage("engine")
    prefill, decode = derive_profiles(spec.profiles, graph_inputs(model))
    assert len(decode.inputs) == 3 + 2 * 4  # ids, mask, positions and the past of 4 layers
    assert decode.inputs["attention_mask"].max == (4, 128) and decode.inputs["attention_mask"].min == (1, 2)
    assert decode.inputs["past_key_values.3.value"].max == (4, 2, 127, 32)
    assert prefill.inputs["past_key_values.0.key"].max == (2, 2, 0, 32)
    chain = loader_chain(model, Path("model.plan"), to_polygraphy([prefill, decode]), settings_from_spec(spec),
                         fake_trt())
    assert chain._engine._network.path == str(model)


@pytest.mark.skipif(detect_gpu().can_build, reason="this machine can build TensorRT engines")
def test_cli_exit_codes_without_gpu(runs):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--cache-dir", str(runs["cache"])],
                              capture_output=True, text=True, cwd=ROOT)

    recipe = str(runs["root"] / "trt.yaml")
    until = cli("run", recipe, "--until", "precision", "--json")
    assert until.returncode == 0, until.stderr
    assert [s["cached"] for s in json.loads(until.stdout)["stages"]] == [True] * 4
    full = cli("run", recipe)
    assert full.returncode == 2 and "needs an NVIDIA GPU" in full.stderr and "Traceback" not in full.stderr
    plan = cli("plan", recipe)
    assert plan.returncode == 0 and "cannot build here" in plan.stdout


def test_schema_check_without_tritonclient_is_counted_as_not_checked(runs, monkeypatch):
    import pipeline.triton as triton

    def missing(text):
        raise ImportError("No module named 'tritonclient'")

    monkeypatch.setattr(triton, "parse_config", missing)
    result = Pipeline.from_recipe(runs["root"] / "ort.yaml", cache_dir=runs["cache"]).run(force="package")
    v = result.stage("package").verify
    assert v["passed"] and not v["metrics"]["schema_checked"]
    assert [n["what"] for n in v["not_checked"]] == ["config.pbtxt against Triton's ModelConfig schema"]
    assert "## Not checked (1)" in (result.run_dir / "report.md").read_text()


def test_an_engine_that_does_not_say_how_it_is_served_is_not_packaged(runs, tmp_path):
    import copy

    from pipeline.cache import Entry
    from pipeline.errors import StageError

    pipe = Pipeline.from_recipe(runs["root"] / "ort.yaml", cache_dir=runs["cache"])
    stages = pipe._stages(pipe._context())
    engine = pipe.cache.lookup(runs["ort"].stage("engine").key)
    meta = copy.deepcopy(engine.meta)
    del meta["stage_meta"]["artifact"]["serving"]
    with pytest.raises(StageError, match="does not say how a server loads it"):
        stages[-1].build(Entry(engine.key, engine.path, meta), tmp_path)
