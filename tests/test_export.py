"""Export parity on tiny random models built from config (no weights needed for parity)."""

import numpy as np
import onnx
import pytest

from pipeline import Pipeline
from pipeline.runtime.base import position_ids_from_mask
from pipeline.runtime.ort_lm import OrtLM, SessionSettings
from pipeline.runtime.torch_lm import TorchLM, load_hf_causal_lm
from pipeline.verify.accuracy import left_pad

from .conftest import build_random_llama, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(random_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    recipe = write_recipe(tmp / "r.yaml", random_llama, stages="\n  - type: export\n")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp / "cache").run()
    entry = result.stage("export")
    return entry, random_llama


def test_axes_are_named_and_dynamic(exported):
    entry, _ = exported
    model = onnx.load(entry.artifact)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 2, "total_sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 2048]


def test_export_metrics_recorded(exported):
    entry, _ = exported
    m = entry.verify["metrics"]
    assert entry.verify["passed"]
    assert m["prefill_max_abs_diff"] < 1e-4 and m["decode_max_abs_diff"] < 1e-4
    assert m["greedy_tokens_matched"] == m["greedy_tokens_total"] == 8


def test_multi_step_decode_with_padding_matches_torch(exported):
    """Batch 3, left padding of different lengths, then 5 decode steps through the KV cache."""
    entry, folder = exported
    import json
    from pathlib import Path

    io = json.loads((Path(entry.artifact).parent / "io.json").read_text())
    ort_lm = OrtLM(Path(entry.artifact), io, SessionSettings(graph_optimization_level="basic"))
    model, _ = load_hf_causal_lm(folder)
    torch_lm = TorchLM(model)
    rng = np.random.default_rng(0)
    ids, mask = left_pad([list(rng.integers(3, 2048, n)) for n in (7, 3, 5)], 0)
    runners = {"ort": ort_lm, "torch": torch_lm}
    state = {k: (r.empty_past(3), ids, mask) for k, r in runners.items()}
    for step in range(6):
        logits = {}
        for k, r in runners.items():
            past, step_ids, step_mask = state[k]
            pos = position_ids_from_mask(step_mask)[:, -step_ids.shape[1]:]
            out, past = r.forward(step_ids, step_mask, pos, past)
            logits[k] = out
            state[k] = (past, step_ids, step_mask)
        real = mask.astype(bool) if step == 0 else np.ones(logits["ort"].shape[:2], bool)
        diff = np.abs(logits["ort"] - logits["torch"])[real].max()
        assert diff < 1e-4, f"step {step}: {diff}"
        nxt = np.argmax(logits["torch"][:, -1], -1)[:, None].astype(np.int64)
        for k in runners:
            past, _, step_mask = state[k]
            state[k] = (past, nxt, np.concatenate([step_mask, np.ones((3, 1), np.int64)], 1))


def test_mha_model_exports(tmp_path):
    """num_key_value_heads == num_attention_heads (plain multi-head attention)."""
    folder = build_random_llama(tmp_path / "mha", seed=1, num_key_value_heads=4)
    recipe = write_recipe(tmp_path / "r.yaml", folder, stages="\n  - type: export\n    opset: 23\n")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    assert result.stage("export").verify["passed"]


def test_external_data_through_every_stage(tmp_path, random_llama):
    """The >2 GB path (weights in external data) exercised on a tiny model by lowering the threshold."""
    from pathlib import Path

    recipe = write_recipe(tmp_path / "r.yaml", random_llama, stages="""
  - type: export
    external_data_threshold_mb: 0.01
  - type: simplify
    tool: onnxslim
  - type: precision
    mode: fp16
    verify: {min_top1_agreement: 0.0}
  - type: engine
""")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    for name in ("export", "simplify", "precision", "engine"):
        folder = Path(result.stage(name).artifact).parent
        assert (folder / "model.onnx.data").is_file(), name
        assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size, name
        assert result.stage(name).verify["passed"]


def test_fp16_kv_cache_at_the_graphs_edge(tmp_path, random_llama):
    """kv_cache_dtype float16: past inputs and present outputs are FP16 (half the memory a server holds),
    the model computes in FP32 inside, and decode with the FP16 cache stays within the stated tolerance."""
    recipe = write_recipe(tmp_path / "r.yaml", random_llama, stages="""
  - type: export
    opset: 23
    kv_cache_dtype: float16
  - type: simplify
    tool: onnxslim
  - type: engine
""")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    model = onnx.load(result.stage("engine").artifact, load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["past_key_values.0.key"] == types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    policy = result.stage("engine").verify["thresholds"]
    assert policy["decode_atol"] == {"value": 5e-2, "source": "stages.export default (kv_cache_dtype float16)"}
    m = result.stage("engine").verify["metrics"]
    assert 0 < m["decode_max_abs_diff"] <= 5e-2 and m["prefill_max_abs_diff"] <= 1e-4
    assert m["greedy_tokens_matched"] >= 0.9 * m["greedy_tokens_total"]
