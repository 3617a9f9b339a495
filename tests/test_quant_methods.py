"""GPTQ, AWQ and bitsandbytes in the quantize stage, on the shipped model.

The quality ordering is the point: a broken algorithm (or a misread checkpoint) cannot beat
round-to-nearest with the same bits and group size, so these tests fail if either happens.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Pipeline
from pipeline.quant.formats import AWQ_ORDER, awq_gemm_layer, gptq_v1_layer

from .conftest import ROOT

RECIPES = ROOT / "recipes"


# -- checkpoint layouts, against packers written independently here ------------------------------

def _words(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, value i of each word at bit i*bits; as int32 (wrapping)."""
    per = 32 // bits
    v = values.astype(np.uint64).reshape(*values.shape[:-1], -1, per)
    packed = np.zeros(v.shape[:-1], dtype=np.uint64)
    for i in range(per):
        packed |= v[..., i] << np.uint64(i * bits)
    return packed.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_layout_reads_back(bits):
    rng = np.random.default_rng(0)
    out_f, in_f, group = 16, 64, 32
    q = rng.integers(0, 2**bits, (out_f, in_f))
    z = rng.integers(1, 2**bits, (out_f, in_f // group))
    s = rng.random((in_f // group, out_f)).astype(np.float16)
    tensors = {"l.qweight": torch.from_numpy(_words(q, bits).T.copy()),  # [in*bits/32, out]: packed along the input
               "l.qzeros": torch.from_numpy(_words((z - 1).T, bits)),  # [groups, out*bits/32], zero - 1
               "l.scales": torch.from_numpy(s),
               "l.g_idx": torch.arange(in_f, dtype=torch.int32) // group}
    layer = gptq_v1_layer(tensors, "l", bits, group)
    assert np.array_equal(layer.qweight.numpy(), q) and np.array_equal(layer.zeros.numpy(), z)
    assert np.array_equal(layer.scales.numpy(), s.T.astype(np.float32))
    tensors["l.g_idx"] = torch.randperm(in_f).to(torch.int32) // group
    with pytest.raises(ValueError, match="reordered"):
        gptq_v1_layer(tensors, "l", bits, group)


def test_awq_gemm_layout_reads_back():
    rng = np.random.default_rng(1)
    out_f, in_f, group = 16, 64, 32
    q = rng.integers(0, 16, (out_f, in_f))
    z = rng.integers(0, 16, (out_f, in_f // group))
    packing = [AWQ_ORDER.index(k) for k in range(8)]  # nibble k holds column packing[k] of each 8

    def gemm(values_oi):  # [out, n] -> [n, out/8]: columns interleaved within each word
        t = values_oi.T.reshape(values_oi.shape[1], -1, 8)[:, :, packing].reshape(values_oi.shape[1], -1)
        return torch.from_numpy(_words(t, 4))

    tensors = {"l.qweight": gemm(q), "l.qzeros": gemm(z),
               "l.scales": torch.from_numpy(rng.random((in_f // group, out_f)).astype(np.float16))}
    layer = awq_gemm_layer(tensors, "l", 4, group)
    assert packing == [0, 2, 4, 6, 1, 3, 5, 7]
    assert np.array_equal(layer.qweight.numpy(), q) and np.array_equal(layer.zeros.numpy(), z)


# -- the methods on the shipped model ------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(method_cli):
    """RTN, GPTQ and AWQ W4 g128 asymmetric, evaluated on the same held-out windows (one cache). Their quantize
    stages are the command line's runs of tests/test_failures.py (the same cache), so each method runs once."""
    cache = method_cli.cache
    for method in ("rtn", "gptq", "awq"):
        assert method_cli(f"tiny-llama-{method}-w4.yaml").returncode == 0
    out = {"rtn": Pipeline.from_recipe(RECIPES / "tiny-llama-rtn-w4.yaml", cache_dir=cache).run(until="quantize")}
    for method in ("gptq", "awq"):
        out[method] = Pipeline.from_recipe(RECIPES / f"tiny-llama-{method}-w4.yaml", cache_dir=cache).run()
    return out, cache


def _metrics(result, stage="quantize"):
    return result.stage(stage).verify["metrics"]


@pytest.mark.slow
def test_same_evaluation_for_every_method(runs):
    results, _ = runs
    evals = {m: (_metrics(r)["eval_tokens"], _metrics(r)["perplexity_ref"]) for m, r in results.items()}
    assert len(set(evals.values())) == 1, evals


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_method_beats_rtn_with_the_same_bits_and_group(runs, method):
    results, _ = runs
    rtn, got = _metrics(results["rtn"]), _metrics(results[method])
    info = json.loads((Path(results[method].stage("quantize").artifact).parent / "quantization.json").read_text())
    assert (info["bits"], info["group_size"], info["symmetric"]) == (4, 128, False)
    assert got["kl_mean"] < rtn["kl_mean"], (method, got["kl_mean"], rtn["kl_mean"])
    assert got["perplexity"] < rtn["perplexity"]
    for key in ("perplexity", "perplexity_ref", "kl_mean", "top1_agreement", "quantize_seconds", "peak_rss_mb"):
        assert key in got


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_reloads_and_runs_as_the_exported_model(runs, method):
    """transformers loads the library's checkpoint back into quantized modules, and it computes what
    the dequantized FP32 model/ (which later stages export) computes, up to the kernel's rounding."""
    from transformers import AutoModelForCausalLM

    results, _ = runs
    checkpoint = Path(results[method].stage("quantize").artifact)
    assert checkpoint.name == "checkpoint"
    quantized = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(checkpoint.parent / "model", dtype=torch.float32).eval()
    layer = quantized.model.layers[0].mlp.down_proj
    assert not isinstance(layer, torch.nn.Linear) and hasattr(layer, "qweight"), type(layer)
    ids = torch.tensor([[1, 300, 301, 302, 303, 304, 305, 306]])
    with torch.no_grad():
        a = torch.log_softmax(quantized(ids).logits, -1)
        b = torch.log_softmax(plain(ids).logits, -1)
        generated = quantized.generate(ids, max_new_tokens=8, do_sample=False)
    kl = (b.exp() * (b - a)).sum(-1).mean().item()
    assert kl < 1e-3, kl
    assert generated.shape == (1, 16)
    assert _metrics(results[method])["kernel_weight_max_rel_diff"] < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_lowered_engine_matches_the_quantized_model(runs, method):
    results, _ = runs
    precision = results[method].stage("precision").verify
    assert precision["passed"] and precision["metrics"]["quantized_matmuls"] == 28
    engine = _metrics(results[method], "engine")
    assert engine["prefill_max_abs_diff"] <= 1e-3 and engine["greedy_tokens_matched"] == engine["greedy_tokens_total"]


@pytest.mark.slow
def test_second_run_is_all_hits(runs):
    _, cache = runs
    again = Pipeline.from_recipe(RECIPES / "tiny-llama-gptq-w4.yaml", cache_dir=cache).run()
    assert all(s.cached for s in again.stages)


@pytest.mark.slow
def test_calibration_text_is_part_of_the_key(tmp_path):
    from pipeline.recipe import load_recipe

    text = (RECIPES / "tiny-llama-gptq-w4.yaml").read_text().replace("../models/tiny-llama",
                                                                      str(ROOT / "models" / "tiny-llama"))
    keys = []
    for content in ("first calibration text " * 400, "second calibration text " * 400):
        (tmp_path / "calib.txt").write_text(content)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text.replace("text: pydoc:calib", "text: calib.txt"))
        load_recipe(recipe)
        plan = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").plan()
        keys.append(next(p.key for p in plan if p.name == "quantize"))
    assert keys[0] != keys[1]


@pytest.mark.slow
def test_bitsandbytes_nf4_checkpoint_reloads_quantized(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    result = Pipeline.from_recipe(RECIPES / "tiny-llama-bnb-nf4.yaml", cache_dir=tmp_path).run()
    metrics = _metrics(result)
    assert 0 < metrics["kl_mean"] < 0.2 and metrics["perplexity"] > metrics["perplexity_ref"]
    folder = Path(result.stage("quantize").artifact)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 300, 301]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_missing_library_names_the_package_to_install(monkeypatch):
    import importlib.util

    from pipeline.errors import StageError
    from pipeline.quant.methods import METHODS

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(StageError, match=r"method gptq needs the Python package gptqmodel.*pip install gptqmodel"):
        METHODS["gptq"].check_installed()
