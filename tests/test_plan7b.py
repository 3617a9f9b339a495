"""`plan` on the 7B recipe with only the model's config.json: stages, weight memory per precision,
KV-cache memory at the TensorRT profiles' largest shapes, and the verdict against the GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import Pipeline
from pipeline.errors import ModelError
from pipeline.gpu import GpuFingerprint

from .conftest import ROOT

RECIPE = ROOT / "recipes" / "llama7b-int8.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "llama7b"
NO_GPU = GpuFingerprint(present=False, reason="nvidia-smi not found: no NVIDIA driver")
L4 = GpuFingerprint(present=True, name="NVIDIA L4", compute_capability="8.9", sm_count=58,
                    memory_bytes=23034 * 1024**2, driver="570.86.15", cuda="12.8", tensorrt=None)

# LLaMA-2-7B: 32 layers, 32 KV heads of 128, vocabulary 32000, hidden 4096, MLP 11008
KV_PER_TOKEN_FP16 = 2 * 32 * 32 * 128 * 2


def pipe(tmp_path, recipe=RECIPE, gpu=NO_GPU):
    return Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache", gpu_probe=lambda: gpu)


def test_fixture_ships_only_the_config():
    assert sorted(p.name for p in FIXTURE.iterdir()) == ["config.json"]


def test_plan_works_with_only_config_json(tmp_path):
    planned = pipe(tmp_path).plan()
    assert [p.name for p in planned] == ["load", "quantize", "export", "simplify", "precision", "engine", "package"]
    assert all(p.status == "miss" for p in planned)
    assert "config.json only" in planned[0].detail
    assert "cannot build here" in planned[5].detail


def test_run_still_needs_the_weights(tmp_path):
    with pytest.raises(ModelError, match=r"no \*.safetensors weights") as err:
        pipe(tmp_path).run(check_memory=False)
    assert err.value.exit_code == 2


def test_weight_and_kv_cache_figures(tmp_path):
    p = pipe(tmp_path)
    est = p.gpu_estimate(p.plan())
    assert est.parameters == 6_738_415_616  # LLaMA-2-7B's published count
    assert est.weights == {"fp32": 4 * est.parameters, "fp16": 2 * est.parameters, "int8": est.parameters,
                           "int4": est.parameters // 2}
    # 2 x layers x kv_heads x head_dim x tokens x batch x bytes: 1.07 GB per 2048-token FP16 sequence
    assert est.kv_per_sequence(2048) == KV_PER_TOKEN_FP16 * 2048 == 1_073_741_824
    prefill, decode = est.kv
    assert (prefill.batch, prefill.past_tokens, prefill.total_tokens) == (4, 0, 2048)
    assert (decode.batch, decode.past_tokens, decode.total_tokens) == (8, 2047, 2048)
    assert decode.fp16_bytes == 8 * 1_073_741_824
    # a TensorRT recipe's graph keeps its KV cache in FP16: past and present together at 2 bytes
    assert decode.io_dtype == "fp16" and decode.io_bytes == KV_PER_TOKEN_FP16 * 8 * (2047 + 2048)
    # INT8 weight MatMuls; embedding and LM head stay FP32
    vocab_hidden = 32000 * 4096
    assert est.engine_weights == (est.parameters - 2 * vocab_hidden - 65 * 4096) + 2 * vocab_hidden * 4 + 65 * 4096 * 4
    assert est.need == est.engine_weights + decode.io_bytes


def test_gpu_verdict_from_the_recipe_and_from_this_machines_gpu(tmp_path):
    p = pipe(tmp_path)
    est = p.gpu_estimate(p.plan())
    assert est.gpu_memory == 48e9 and est.gpu_source.startswith("engine.gpu_memory_gb") and not est.warnings
    on_l4 = pipe(tmp_path, gpu=L4)
    est = on_l4.gpu_estimate(on_l4.plan())
    assert est.gpu_memory == 23034 * 1024**2 and "NVIDIA L4" in est.gpu_source
    assert any("the engine needs at least 24.70 GB" in w and "24.15 GB" in w for w in est.warnings)


def test_fp32_kv_cache_is_a_choice(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("../tests/fixtures/llama7b", str(FIXTURE))
                      .replace("    opset: 18 ", "    kv_cache_dtype: float32\n    opset: 18 "))
    p = pipe(tmp_path, recipe)
    assert p.recipe.recipe.stage("export").kv_cache_dtype == "float32"
    decode = p.gpu_estimate(p.plan()).kv[1]
    assert decode.io_dtype == "fp32" and decode.io_bytes == KV_PER_TOKEN_FP16 * 2 * 8 * (2047 + 2048)


def test_no_gpu_and_no_gpu_memory_option_is_said(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("../tests/fixtures/llama7b", str(FIXTURE))
                      .replace("    gpu_memory_gb: 48", "    # no gpu_memory_gb"))
    p = pipe(tmp_path, recipe)
    est = p.gpu_estimate(p.plan())
    assert est.gpu_memory is None and any("set engine.gpu_memory_gb" in w for w in est.warnings)


def test_cli_plan_prints_the_figures(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(RECIPE), "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for line in ("model: 6.74 B parameters; weights fp32 26.95 GB, fp16 13.48 GB, int8 6.74 GB, int4 3.37 GB",
                 "KV cache per 2048-token sequence at FP16: 1.07 GB",
                 "KV cache, profile 'decode' at max (batch 8 x 2048 tokens): 8.59 GB at FP16",
                 "(engine.gpu_memory_gb in the recipe): fits"):
        assert line in text
    for stage in ("load", "quantize", "export", "simplify", "precision", "engine", "package"):
        assert f"\n{stage} " in "\n" + text


def test_parameter_count_matches_the_shipped_models_weights():
    """The formula behind the 7B figures, checked on real weights (a GQA LLaMA: 4 heads, 2 KV heads)."""
    import json
    import math

    from safetensors import safe_open

    from pipeline.arch import arch_for
    from pipeline.sizing import parameter_count

    from .conftest import SHIPPED_MODEL

    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    geometry = arch_for(config, "config.json").geometry(config).__dict__
    with safe_open(str(SHIPPED_MODEL / "model.safetensors"), framework="np") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not iterable)
    params = parameter_count(config, geometry)
    assert params.total == stored
    assert params.lm_head == (0 if config.get("tie_word_embeddings") else params.embedding)


def test_disk_per_stage(tmp_path):
    """Each artifact's size on disk: the float32 graph through simplify, the INT8 graph after precision."""
    disk = {p.name: p.disk_bytes for p in pipe(tmp_path).plan()}
    fp32 = 4 * 6_738_415_616
    assert disk["load"] == disk["package"] == 0
    assert disk["quantize"] == disk["export"] == disk["simplify"] == pytest.approx(fp32, rel=0.01)
    assert 0.2 * fp32 < disk["precision"] == disk["engine"] < 0.35 * fp32  # INT8 weights, FP32 embeddings and norms
