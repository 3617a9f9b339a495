"""INT4 lowering of the quantize stage's own integers: MatMulNBits for ONNX Runtime, blocked
DequantizeLinear (opset 21) for TensorRT, both verified against the quantized PyTorch model."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline import Pipeline
from pipeline.lowering import _pack_nibbles, load_qparams

from .conftest import SHIPPED_MODEL, write_recipe

VERIFY = "\n  greedy_tokens: 16\n  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}\n"
STAGES = """
  - type: quantize
    method: rtn
    bits: 4
    group_size: {group}
  - type: export
    opset: {opset}
  - type: precision
    mode: int4
    int4_format: {fmt}
  - type: engine
"""


def test_nibble_packing_low_first():
    values = np.array([[1, 2, 3, 4, 15]], dtype=np.uint8)
    packed = _pack_nibbles(values)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int4-cache")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,opset,group", [("matmulnbits", 18, 64), ("dq", 21, 128)])
def test_int4_lowering_reproduces_the_quantized_model(tmp_path, cache, fmt, opset, group):
    recipe = write_recipe(tmp_path / "r.yaml", SHIPPED_MODEL, stages=STAGES.format(fmt=fmt, opset=opset, group=group),
                          verify=VERIFY, name=f"int4-{fmt}")
    result = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    for name in ("precision", "engine"):
        m = result.stage(name).verify["metrics"]
        assert result.stage(name).verify["passed"]
        assert m["prefill_max_abs_diff"] <= 1e-3 and m["greedy_tokens_matched"] == 16
    assert result.stage("precision").verify["metrics"]["quantized_matmuls"] == 28

    model = onnx.load(result.stage("precision").artifact)
    from pathlib import Path

    _, params = load_qparams(Path(result.stage("quantize").artifact).parent)
    inits = {i.name: i for i in model.graph.initializer}
    name = "model.layers.0.mlp.down_proj"
    if fmt == "matmulnbits":
        nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 28 and all(n.domain == "com.microsoft" for n in nodes)
        packed = numpy_helper.to_array(inits[f"{name}.int4.qweight"])
        q = params[f"{name}.qweight"]
        assert np.array_equal(packed.reshape(q.shape[0], -1), _pack_nibbles(q)), "the stage's own integers"
    else:
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 28
        assert all(next(a.i for a in n.attribute if a.name == "block_size") == group for n in dq)
        assert inits[f"{name}.int4.qweight"].data_type == onnx.TensorProto.UINT4
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
              and min(i.dims) >= 128 and 2048 not in i.dims]  # vocabulary-sized: embedding, LM head
    assert not floats, "no FP32 copy of a lowered weight is left in the graph"
