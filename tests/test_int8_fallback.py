"""The INT8 fallback: the weight MatMuls whose inputs carry outliers stay in FP32, chosen by measurement."""

from __future__ import annotations

import pytest

from pipeline import Pipeline
from pipeline.int8_fallback import choose_fp32

from .conftest import build_random_llama, write_recipe


def test_choose_fp32_keeps_the_top_ranked_in_growing_steps_until_the_target():
    nodes = [f"n{i}" for i in range(10)]
    ranking = {n: float(i) for i, n in enumerate(nodes)}  # n9 has the worst outliers
    tried: list[list[str]] = []

    def quantize(selected):
        tried.append(selected)
        return len(tried)

    def measure(attempt):
        return {1: 1.0, 2: 0.5, 3: 0.2, 4: 0.05}[attempt]  # KL after keeping 0, 1, 2, 4 layers

    kept, trials, last = choose_fp32(quantize, measure, nodes, ranking, max_kl_mean=0.1, max_layers=16)
    assert kept == ["n9", "n8", "n7", "n6"] and last == 4
    assert [t["kept_fp32"] for t in trials] == [0, 1, 2, 4]
    assert all(n not in tried[-1] for n in kept) and len(tried[-1]) == 6
    kept, trials, _ = choose_fp32(quantize, lambda a: 1.0, nodes, ranking, max_kl_mean=0.1, max_layers=3)
    assert [t["kept_fp32"] for t in trials] == [0, 1, 2, 3] and len(kept) == 3  # the cap, target not reached


def outlier_model(tmp_path):
    """Scaling one MLP channel up by 1000 in up_proj and down by 1000 in down_proj leaves the model's function
    as it was but puts a 1000x outlier channel into layer 1's down_proj input."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_random_llama(tmp_path / "model", seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 1000.0
        mlp.down_proj.weight[:, 5] /= 1000.0
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def int8_recipe(tmp_path, folder, extra: str):
    return write_recipe(tmp_path / "r.yaml", folder, stages=f"""
  - type: export
    opset: 23
  - type: precision
    mode: int8-dynamic
{extra}
    verify: {{max_kl_mean: 1.0, min_top1_agreement: 0.0}}
""")


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["per-tensor", "per-token"])
def test_an_injected_outlier_channel_is_found_and_kept_in_fp32(tmp_path, activations):
    """Without smoothing, the MatMul whose input carries the outlier is the one INT8 hurts most, and the
    one the fallback keeps; keeping it cuts the KL."""
    folder = outlier_model(tmp_path)
    recipe = int8_recipe(tmp_path, folder, f"""    activations: {activations}
    smoothing: {{enabled: false}}
    fp32_fallback: {{max_kl_mean: 1.0e-9, max_layers: 1, samples: 2, seq_len: 32}}""")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    meta = result.stage("precision").meta
    fallback = meta["fp32_fallback"]
    assert [k["layer"] for k in fallback["kept_fp32"]] == ["model.layers.1.mlp.down_proj"]
    assert fallback["kept_fp32"][0]["crest"] > 20  # max |x| over RMS of that input
    without, with_fallback = (t["calibration_kl_mean"] for t in fallback["trials"])
    assert with_fallback * 5 < without, fallback["trials"]
    assert result.stage("precision").verify["metrics"]["fp32_matmuls"] == 1
    assert meta["smoothing"] == {"enabled": False} and meta["activations"] == activations


@pytest.mark.slow
def test_smoothing_absorbs_the_outlier_channel(tmp_path):
    """With smoothing (the default), the same outlier is divided out of the activation and into the weight
    rows: all-INT8 is far closer to FP32 than without, and no layer needs to stay in FP32."""
    folder = outlier_model(tmp_path)
    kl = {}
    for smoothing in ("{enabled: false}", "{alpha: 0.5}"):
        recipe = int8_recipe(tmp_path, folder, f"""    smoothing: {smoothing}
    fp32_fallback: {{max_kl_mean: 1.0e-9, max_layers: 0, samples: 2, seq_len: 32}}""")
        result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
        meta = result.stage("precision").meta
        kl[smoothing] = meta["fp32_fallback"]["trials"][0]["calibration_kl_mean"]
    assert meta["smoothing"]["enabled"] and meta["smoothing"]["factor_max"] > 10
    assert kl["{alpha: 0.5}"] * 5 < kl["{enabled: false}"], kl
