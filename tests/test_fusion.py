"""Attention fusion (pipeline/fusion.py): each layer's opset-23 attention becomes one 3-D Attention node
with its KV cache, with the same outputs, on GQA and MHA models; other graphs are left alone."""

import numpy as np
import onnx
import pytest

from pipeline import Pipeline
from pipeline.fusion import fuse_attention

from .conftest import build_random_llama, write_recipe

pytestmark = pytest.mark.slow

EXPORT23 = "\n  - type: export\n    opset: 23\n"
VERIFY = "\n  greedy_tokens: 4\n  latency: {warmup: 0, repeats: 1, prompt_tokens: 8, decode_tokens: 2}\n"


def _feeds(session, batch=2, new=5, past=7, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(3, 500, (batch, new)),
             "attention_mask": np.ones((batch, new + past), np.int64),
             "position_ids": np.tile(np.arange(past, past + new), (batch, 1))}
    feeds["attention_mask"][1, :3] = 0  # left padding in the past
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feeds


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_fused_graph_computes_the_same(tmp_path, kv_heads):
    model_dir = build_random_llama(tmp_path / "m", num_key_value_heads=kv_heads)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, stages=EXPORT23, verify=VERIFY)
    exported = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run().stage("export").artifact
    model = onnx.load(exported)
    before = len(model.graph.node)
    counts = fuse_attention(model)
    assert counts == {"fused": 2, "skipped": 0}
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == 2 and "Transpose" not in ops, "no head transposes left"
    assert before - len(model.graph.node) >= 2 * 10
    fused_path = tmp_path / "fused.onnx"
    onnx.save(model, str(fused_path))
    a, b = _session(exported), _session(fused_path)
    feeds = _feeds(a)
    names = [o.name for o in a.get_outputs()]
    for name, x, y in zip(names, a.run(None, feeds), b.run(names, feeds)):
        assert x.shape == y.shape and np.abs(x - y).max() <= 1e-5, name


def test_graph_without_the_pattern_is_left_alone(tmp_path):
    model_dir = build_random_llama(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, stages="\n  - type: export\n    opset: 18\n", verify=VERIFY)
    exported = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run().stage("export").artifact
    model = onnx.load(exported)
    before = onnx.helper.printable_graph(model.graph)
    assert fuse_attention(model)["fused"] == 0
    assert onnx.helper.printable_graph(model.graph) == before


def test_shipped_engine_is_fused_and_verified(shipped_run):
    result, _ = shipped_run
    engine = result.stage("engine").verify
    assert engine["passed"] and engine["metrics"]["attention_layers_fused"] == 4
    assert engine["metrics"]["prefill_max_abs_diff"] <= 1e-4
