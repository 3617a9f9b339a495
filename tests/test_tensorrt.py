"""TensorRT engine stage without TensorRT: profiles, the Polygraphy loader chain, the GPU
fingerprint, cache keys and the timing cache. The build itself needs a GPU (test_gpu_* at the end)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pipeline import Pipeline
from pipeline.errors import RecipeError, ResourceError, StageError
from pipeline.gpu import GpuFingerprint, detect_gpu, parse_smi, parse_smi_cuda
from pipeline.stages.engine_trt import TensorRTEngineConfig
from pipeline.tensorrt.profiles import (
    GraphInput,
    TrtProfile,
    axis_ranges,
    check_decoder_axes,
    derive_profile,
    derive_profiles,
    graph_inputs,
    profile_for,
    to_polygraphy,
)

from .conftest import SHIPPED_MODEL

PREFILL = {"name": "prefill", "axes": {"batch": {"min": 1, "opt": 1, "max": 4},
                                       "sequence": {"min": 1, "opt": 64, "max": 256},
                                       "past_sequence": {"min": 0, "opt": 0, "max": 0}}}
DECODE = {"name": "decode", "axes": {"batch": {"min": 1, "opt": 2, "max": 8},
                                     "sequence": {"min": 1, "opt": 1, "max": 1},
                                     "past_sequence": {"min": 1, "opt": 100, "max": 255}}}
DECODER_INPUTS = [
    GraphInput("input_ids", ("batch", "sequence"), "INT64"),
    GraphInput("attention_mask", ("batch", "total_sequence"), "INT64"),
    GraphInput("position_ids", ("batch", "sequence"), "INT64"),
    GraphInput("past_key_values.0.key", ("batch", 2, "past_sequence", 32), "FLOAT"),
    GraphInput("past_key_values.0.value", ("batch", 2, "past_sequence", 32), "FLOAT"),
]

H100 = GpuFingerprint(present=True, name="NVIDIA H100 80GB HBM3", compute_capability="9.0", sm_count=132,
                      memory_bytes=80 * 1024**3, driver="570.86.15", cuda="12.8", tensorrt="10.13.0",
                      os="Linux", arch="x86_64")
A100 = GpuFingerprint(present=True, name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", sm_count=108,
                      memory_bytes=80 * 1024**3, driver="570.86.15", cuda="12.8", tensorrt="10.13.0",
                      os="Linux", arch="x86_64")
H100_TRT11 = GpuFingerprint(**{**H100.__dict__, "tensorrt": "11.0.0"})
NO_GPU = GpuFingerprint(present=False, reason="nvidia-smi not found: no NVIDIA driver")


def profile(data) -> TrtProfile:
    return TrtProfile.model_validate(data)


# ---- profiles --------------------------------------------------------------------------
def test_total_sequence_is_derived_from_past_and_new_tokens():
    assert axis_ranges(profile(DECODE))["total_sequence"] == (2, 101, 256)
    assert axis_ranges(profile(PREFILL))["total_sequence"] == (1, 64, 256)


def test_profiles_map_named_axes_onto_every_dynamic_input():
    d = derive_profile(profile(DECODE), DECODER_INPUTS)
    assert d.inputs["input_ids"].min == (1, 1) and d.inputs["input_ids"].max == (8, 1)
    assert d.inputs["attention_mask"].opt == (2, 101) and d.inputs["attention_mask"].max == (8, 256)
    past = d.inputs["past_key_values.0.key"]
    assert (past.min, past.opt, past.max) == ((1, 2, 1, 32), (2, 2, 100, 32), (8, 2, 255, 32))


def test_static_inputs_get_no_profile_entry():
    inputs = DECODER_INPUTS + [GraphInput("scale", (1, 4), "FLOAT")]
    assert "scale" not in derive_profile(profile(DECODE), inputs).inputs


def test_profile_without_an_axis_the_graph_uses_is_an_error():
    encoder_profile = profile({"name": "enc", "axes": {"batch": {"min": 1, "opt": 1, "max": 2},
                                                       "sequence": {"min": 1, "opt": 8, "max": 16}}})
    with pytest.raises(RecipeError, match=r"^r.yaml: profile 'enc' gives no range for axis 'past_sequence', which "
                                          r"graph input attention_mask uses through total_sequence"):
        derive_profile(encoder_profile, DECODER_INPUTS, "r.yaml")
    with pytest.raises(RecipeError, match=r"axis 'past_sequence', which graph input past_key_values.0.key uses \("):
        derive_profile(encoder_profile, [i for i in DECODER_INPUTS if i.name != "attention_mask"])


def test_profile_axis_the_graph_lacks_is_an_error():
    encoder_inputs = [GraphInput("input_ids", ("batch", "sequence"), "INT64"),
                      GraphInput("attention_mask", ("batch", "sequence"), "INT64")]
    with pytest.raises(RecipeError, match="bounds past_sequence, which this graph does not declare"):
        derive_profile(profile(DECODE), encoder_inputs)


def test_unnamed_dynamic_dimension_is_an_error():
    with pytest.raises(RecipeError, match="unnamed dynamic dimension 1"):
        derive_profile(profile(DECODE), [GraphInput("input_ids", ("batch", None), "INT64")])


def test_decoder_profiles_need_past_sequence_before_any_graph_exists():
    no_past = profile({"name": "p", "axes": {"batch": {"min": 1, "opt": 1, "max": 1},
                                             "sequence": {"min": 1, "opt": 1, "max": 1}}})
    check_decoder_axes([no_past], "feature-extraction")
    with pytest.raises(RecipeError, match="profile 'p' gives no range for past_sequence"):
        check_decoder_axes([no_past], "causal-lm")


def test_graph_inputs_read_from_an_onnx_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "sequence"])
    init = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x, w], [y], [init])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert graph_inputs(tmp_path / "m.onnx") == [GraphInput("input_ids", ("batch", "sequence"), "INT64")]


def test_polygraphy_profiles_and_profile_choice():
    derived = derive_profiles([profile(PREFILL), profile(DECODE)], DECODER_INPUTS)
    prefill, decode = to_polygraphy(derived)
    assert tuple(prefill["input_ids"].max) == (4, 256)
    assert tuple(decode["past_key_values.0.value"].opt) == (2, 2, 100, 32)
    assert profile_for(derived, {"input_ids": (1, 40), "past_key_values.0.key": (1, 2, 0, 32)}) == 0
    assert profile_for(derived, {"input_ids": (3, 1), "past_key_values.0.key": (3, 2, 77, 32)}) == 1
    assert profile_for(derived, {"input_ids": (1, 1), "past_key_values.0.key": (1, 2, 999, 32)}) is None


# ---- the loader chain ------------------------------------------------------------------
def fake_trt():
    """Stand-in for the tensorrt module's enums: members are their own qualified names."""
    members = {"HardwareCompatibilityLevel": ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"),
               "MemoryPoolType": ("WORKSPACE",)}
    return SimpleNamespace(__version__="stub", **{enum: SimpleNamespace(**{m: f"{enum}.{m}" for m in names})
                                                  for enum, names in members.items()})


def trt_spec(**options) -> TensorRTEngineConfig:
    return TensorRTEngineConfig.model_validate({"type": "engine", "backend": "tensorrt",
                                               "profiles": [PREFILL, DECODE], **options})


def test_loader_chain_carries_profiles_and_options_by_name(tmp_path):
    from pipeline.tensorrt.build import loader_chain, settings_from_spec

    spec = trt_spec(builder_optimization_level=5, hardware_compatibility_level="AMPERE_PLUS",
                    version_compatible=True, exclude_lean_runtime=True, workspace_mb=512)
    settings = settings_from_spec(spec)
    assert json.loads(json.dumps(settings.to_dict()))["hardware_compatibility_level"] == "AMPERE_PLUS"
    derived = derive_profiles(spec.profiles, DECODER_INPUTS)
    save = loader_chain(tmp_path / "model.onnx", tmp_path / "model.plan", to_polygraphy(derived), settings,
                        fake_trt(), tmp_path / "timing.cache")
    assert save.path == str(tmp_path / "model.plan")
    engine = save._engine
    network, config = engine._network, engine._config
    assert network.path == str(tmp_path / "model.onnx") and network.strongly_typed is True
    assert [tuple(p["attention_mask"].max) for p in config.profiles] == [(4, 256), (8, 256)]
    assert config.builder_optimization_level == 5
    assert config.hardware_compatibility_level == "HardwareCompatibilityLevel.AMPERE_PLUS"
    assert config.version_compatible is True and config.exclude_lean_runtime is True
    assert config.memory_pool_limits == {"MemoryPoolType.WORKSPACE": 512 * 1024**2}
    assert config.timing_cache_path == engine.timing_cache_path == str(tmp_path / "timing.cache")
    # strongly typed: no precision flag, no calibrator
    assert not any((config.fp16, config.int8, config.bf16, config.fp8, config.tf32))
    assert config.calibrator is None and config.precision_constraints is None


def test_loader_chain_without_timing_cache_and_with_defaults(tmp_path):
    from pipeline.tensorrt.build import loader_chain, settings_from_spec

    settings = settings_from_spec(trt_spec())
    save = loader_chain(tmp_path / "m.onnx", tmp_path / "m.plan", [], settings, fake_trt())
    config = save._engine._config
    assert config.timing_cache_path is None and save._engine.timing_cache_path is None
    assert config.memory_pool_limits is None and config.version_compatible is False
    assert config.hardware_compatibility_level == "HardwareCompatibilityLevel.NONE"


def test_enum_name_missing_from_this_tensorrt_is_a_clear_error(tmp_path):
    from pipeline.tensorrt.build import loader_chain, settings_from_spec

    trt = fake_trt()
    del trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    settings = settings_from_spec(trt_spec(hardware_compatibility_level="SAME_COMPUTE_CAPABILITY"))
    with pytest.raises(StageError, match="TensorRT stub has no HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"):
        loader_chain(tmp_path / "m.onnx", tmp_path / "m.plan", [], settings, trt)


def test_building_the_chain_imports_no_tensorrt():
    import subprocess
    import sys

    code = ("import sys; from pipeline.tensorrt.build import loader_chain; "
            "from polygraphy.backend.trt import NetworkFromOnnxPath, CreateConfig; "
            "NetworkFromOnnxPath('m.onnx', strongly_typed=True); CreateConfig(); print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- GPU fingerprint -------------------------------------------------------------------
SMI_QUERY = "NVIDIA H100 80GB HBM3, 9.0, 81559, 570.86.15\n"
SMI_BANNER = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8     |\n"


def test_nvidia_smi_parsing():
    info = parse_smi(SMI_QUERY.strip())
    assert info == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                    "memory_bytes": 81559 * 1024**2, "driver": "570.86.15"}
    assert parse_smi_cuda(SMI_BANNER) == "12.8" and parse_smi_cuda("no banner") is None
    with pytest.raises(ValueError):
        parse_smi("garbage")


def test_detect_gpu_from_injected_nvidia_smi(monkeypatch):
    import pipeline.gpu

    def run(cmd):
        return SMI_QUERY if any(a.startswith("--query-gpu") for a in cmd) else SMI_BANNER

    monkeypatch.setattr(pipeline.gpu, "_sm_count", lambda index: (132, None))  # no CUDA runtime here
    gpu = detect_gpu(run=run)
    assert gpu.present and gpu.name == "NVIDIA H100 80GB HBM3" and gpu.compute_capability == "9.0"
    assert gpu.sm_count == 132 and gpu.cuda == "12.8" and gpu.driver == "570.86.15"
    assert "sm_90, 132 SMs, 80 GiB" in gpu.describe()
    assert not detect_gpu(index=1, run=run).present


def test_detect_gpu_reports_why_when_nvidia_smi_fails():
    import subprocess

    def run(cmd):
        raise subprocess.CalledProcessError(9, cmd)

    gpu = detect_gpu(run=run)
    assert not gpu.present and "nvidia-smi failed" in gpu.why_not() and not gpu.can_build


def test_this_machine_without_a_gpu_says_so():
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    gpu = detect_gpu()
    assert not gpu.present and "nvidia-smi not found" in gpu.reason and "no GPU" in gpu.describe()


def test_gpu_with_no_tensorrt_cannot_build():
    gpu = GpuFingerprint(**{**H100.__dict__, "tensorrt": None})
    assert gpu.present and not gpu.can_build and "TensorRT is not installed" in gpu.why_not()


# ---- cache keys and plan ---------------------------------------------------------------
def trt_recipe(tmp_path, engine_extra: str = "") -> object:
    text = f"""schema_version: 1
name: tiny-trt
model: {{path: {SHIPPED_MODEL}}}
stages:
  - type: export
  - type: engine
    backend: tensorrt
    profiles:
      - {json.dumps(PREFILL)}
      - {json.dumps(DECODE)}
{engine_extra}"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def plan(recipe, cache, gpu):
    return {p.name: p for p in Pipeline.from_recipe(recipe, cache_dir=cache, gpu_probe=lambda: gpu).plan()}


def test_engine_key_changes_with_gpu_and_tensorrt_version_only(tmp_path):
    recipe, cache = trt_recipe(tmp_path), tmp_path / "cache"
    h100, a100, trt11 = plan(recipe, cache, H100), plan(recipe, cache, A100), plan(recipe, cache, H100_TRT11)
    assert h100["export"].key == a100["export"].key == trt11["export"].key
    assert len({h100["engine"].key, a100["engine"].key, trt11["engine"].key}) == 3
    assert plan(recipe, cache, H100)["engine"].key == h100["engine"].key


def test_gpu_memory_option_does_not_change_the_engine_key(tmp_path):
    base = plan(trt_recipe(tmp_path), tmp_path / "c", H100)["engine"].key
    other = plan(trt_recipe(tmp_path, "    gpu_memory_gb: 24\n"), tmp_path / "c", H100)["engine"].key
    changed = plan(trt_recipe(tmp_path, "    builder_optimization_level: 5\n"), tmp_path / "c", H100)["engine"].key
    assert base == other != changed


def _commit_engine_entry(cache_dir, planned):
    """Record in the cache an engine entry with the metadata a build for that target leaves."""
    from pipeline.cache import ArtifactCache

    store = ArtifactCache(cache_dir)
    engine = planned["engine"]
    material = engine.stage.key_material(planned["export"].key)
    with store.building(engine.key) as tmp:
        (tmp / "engine.json").write_text(json.dumps({"gpu": material["target"]["gpu"]}))
        store.commit(engine.key, tmp, {"stage": "engine", "key": engine.key, "parent": planned["export"].key,
                                       "key_material": material, "verify": {"passed": True}})


def test_plan_says_why_an_engine_for_another_gpu_is_a_miss(tmp_path):
    recipe, cache = trt_recipe(tmp_path), tmp_path / "cache"
    _commit_engine_entry(cache, plan(recipe, cache, A100))
    assert plan(recipe, cache, A100)["engine"].status == "hit"
    on_h100 = plan(recipe, cache, H100)["engine"]
    assert on_h100.status == "miss"
    assert "an entry exists for another target" in on_h100.detail
    assert "gpu.name 'NVIDIA A100-SXM4-80GB' there, 'NVIDIA H100 80GB HBM3' here" in on_h100.detail
    assert "gpu.compute_capability '8.0' there, '9.0' here" in on_h100.detail


def test_plan_says_why_an_engine_for_another_tensorrt_is_a_miss(tmp_path):
    recipe, cache = trt_recipe(tmp_path), tmp_path / "cache"
    _commit_engine_entry(cache, plan(recipe, cache, H100))
    detail = plan(recipe, cache, H100_TRT11)["engine"].detail
    assert "gpu.tensorrt '10.13.0' there, '11.0.0' here" in detail
    assert "gpu.name" not in detail


def test_plan_on_a_machine_without_gpu(tmp_path):
    engine = plan(trt_recipe(tmp_path), tmp_path / "cache", NO_GPU)["engine"]
    assert engine.status == "miss" and "cannot build here: nvidia-smi not found" in engine.detail


def test_plan_refuses_a_decoder_profile_without_past_sequence(tmp_path):
    recipe = trt_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace(', "past_sequence": {"min": 0, "opt": 0, "max": 0}', ""))
    with pytest.raises(RecipeError, match="profile 'prefill' gives no range for past_sequence"):
        plan(recipe, tmp_path / "cache", H100)


def test_engine_refuses_to_start_without_gpu(tmp_path):
    pipe = Pipeline.from_recipe(trt_recipe(tmp_path), cache_dir=tmp_path / "cache", gpu_probe=lambda: NO_GPU)
    stage = pipe.plan()[-1].stage
    with pytest.raises(ResourceError, match=r"needs an NVIDIA GPU.*--until export"):
        stage.preflight()


# ---- timing cache ----------------------------------------------------------------------
def test_timing_cache_keys_and_locked_atomic_update(tmp_path):
    from pipeline.cache import ArtifactCache
    from pipeline.tensorrt.timing import TimingCacheStore, timing_cache_key

    keys = {timing_cache_key(g.key(), "NONE") for g in (H100, A100, H100_TRT11)}
    assert len(keys) == 3 and timing_cache_key(H100.key(), "AMPERE_PLUS") not in keys
    store = TimingCacheStore(ArtifactCache(tmp_path))
    key = timing_cache_key(H100.key(), "NONE")
    with store.open(key) as work:
        assert not work.exists() and store.cache.is_locked(key)
        work.write_bytes(b"tactics-1")
    assert store.path(key).read_bytes() == b"tactics-1" and not store.cache.is_locked(key)
    with pytest.raises(RuntimeError), store.open(key) as work:
        assert work.read_bytes() == b"tactics-1"  # a build starts from the saved cache
        work.write_bytes(b"half-written")
        raise RuntimeError("build failed")
    assert store.path(key).read_bytes() == b"tactics-1"
    assert sorted(p.name for p in store.path(key).parent.iterdir()) == [f"{key}.cache"]


# ---- on a GPU with TensorRT ------------------------------------------------------------
def _trt_ready() -> str | None:
    import importlib.util

    gpu = detect_gpu()
    if not gpu.can_build:
        return gpu.why_not()
    if importlib.util.find_spec("polygraphy") is None:
        return "polygraphy is not installed"
    return None


GPU_SKIP = _trt_ready()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=f"needs an NVIDIA GPU with TensorRT: {GPU_SKIP}")
def test_gpu_build_verify_and_package_the_shipped_model(tmp_path):
    from pipeline.triton import parse_config

    recipe = trt_recipe(tmp_path, "  - type: package\n    max_batch_size: 4\n")
    recipe.write_text(recipe.read_text() + "verify:\n  greedy_tokens: 8\n"
                      "  latency: {warmup: 1, repeats: 2, prompt_tokens: 16, decode_tokens: 8}\n")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    engine = result.stage("engine")
    assert engine.verify["passed"], engine.verify["failures"]
    assert set(engine.verify["metrics"]["profiles"]) == {"prefill", "decode"}
    assert engine.verify["metrics"]["decode_tokens_per_s"] > 0
    repo = result.stage("package").artifact
    config = parse_config(next(__import__("pathlib").Path(repo).glob("*/config.pbtxt")).read_text())
    assert config.platform == "tensorrt_plan" and list(config.instance_group[0].profile) == ["0", "1"]
    again = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    assert all(s.cached for s in again.stages)
