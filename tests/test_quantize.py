"""The quantize stage (RTN) on the shipped model: integers, scales and zero points that reproduce the
checkpoint exactly, quality against the original measured on the reloaded checkpoint, and ONNX stages
verified against the quantized model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Pipeline
from pipeline.errors import StageError
from pipeline.quant.rtn import rtn

from .conftest import ROOT, SHIPPED_MODEL, build_random_llama, write_recipe

VERIFY = "\n  greedy_tokens: 8\n  eval_windows: 8\n  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}\n"


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, False), (4, 64, True), (8, 256, False), (8, 256, True)])
def test_rtn_ranges_and_error_bound(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    q, scale, zero, deq = rtn(w, bits, group, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert scale.shape == (32, 256 // group) and zero.shape == scale.shape
    step = scale.repeat_interleave(group, 1)
    assert torch.all((w - deq).abs() <= step / 2 + 1e-6), "round to nearest: error at most half a step"
    if symmetric:
        assert torch.all(zero == 2 ** (bits - 1))
    rebuilt = (q.float() - zero.float().repeat_interleave(group, 1)) * step
    assert torch.equal(rebuilt, deq)


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rtn")
    stages = "\n  - type: quantize\n    method: rtn\n    bits: 4\n    group_size: 128\n  - type: export\n  - type: engine\n"
    recipe = write_recipe(tmp / "r.yaml", SHIPPED_MODEL, stages=stages, verify=VERIFY)
    return Pipeline.from_recipe(recipe, cache_dir=tmp / "cache").run(), recipe, tmp / "cache"


@pytest.mark.slow
def test_rtn_w4_checkpoint_matches_its_integers(w4):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, _, _ = w4
    folder = Path(result.stage("quantize").artifact)
    params = load_file(str(folder.parent / "qparams.safetensors"))
    info = json.loads((folder.parent / "quantization.json").read_text())
    assert info["excluded"] == ["lm_head"] and len(info["layers"]) == 7 * 4
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights = dict(model.named_modules())
    for layer in info["layers"]:
        name, group = layer["name"], layer["group"]
        q, s, z = params[f"{name}.qweight"], params[f"{name}.scales"], params[f"{name}.zeros"]
        assert int(q.max()) <= 15
        w = (q.float() - z.float().repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        assert torch.equal(weights[name].weight.detach(), w), name


@pytest.mark.slow
def test_rtn_w4_quality_is_measured_on_the_reload(w4):
    result, _, _ = w4
    m = result.stage("quantize").verify["metrics"]
    for key in ("perplexity", "perplexity_ref", "kl_mean", "top1_agreement", "quantize_seconds", "peak_rss_mb"):
        assert key in m
    assert 0 < m["kl_mean"] < 0.2 and 0.8 < m["top1_agreement"] < 1.0
    assert m["perplexity"] > m["perplexity_ref"]
    # the ONNX stages reproduce the quantized model, not the original
    for name in ("export", "engine"):
        v = result.stage(name).verify
        assert v["passed"] and v["metrics"]["greedy_tokens_matched"] == v["metrics"]["greedy_tokens_total"]
        assert v["metrics"]["prefill_max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_rtn_second_run_is_all_hits(w4):
    _, recipe, cache = w4
    again = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    assert all(s.cached for s in again.stages)


@pytest.mark.slow
def test_w8_beats_w4_by_far(tmp_path):
    """A broken quantizer cannot pass: 8 bits per channel must be far closer to the original than 4 bits."""
    stages = "\n  - type: quantize\n    method: rtn\n    bits: {bits}\n    group_size: {group}\n  - type: export\n"
    kl = {}
    for bits, group in ((8, -1), (4, 128)):
        recipe = write_recipe(tmp_path / f"w{bits}.yaml", SHIPPED_MODEL, stages=stages.format(bits=bits, group=group),
                              verify=VERIFY, name=f"w{bits}")
        result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run(until="quantize")
        kl[bits] = result.stage("quantize").verify["metrics"]["kl_mean"]
    assert kl[8] * 20 < kl[4], kl


@pytest.mark.slow
def test_group_that_does_not_divide_names_the_layer_and_a_size(tmp_path):
    folder = build_random_llama(tmp_path / "m", hidden_size=96, intermediate_size=192, num_attention_heads=4,
                                num_key_value_heads=2)
    stages = "\n  - type: quantize\n    method: rtn\n    group_size: 64\n  - type: export\n"
    recipe = write_recipe(tmp_path / "r.yaml", folder, stages=stages, verify=VERIFY)
    with pytest.raises(StageError, match=r"layer model.layers.0.self_attn.q_proj has 96 input channels.*group_size 32"):
        Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()


def test_shipped_rtn_recipe_validates():
    from pipeline.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "tiny-llama-rtn-w4.yaml").recipe
    assert r.stages[0].type == "quantize" and r.stages[0].gates().max_kl_mean == 0.5
    assert np.isclose(r.stages[0].gates().min_top1_agreement, 0.6)
