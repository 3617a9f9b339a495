"""The precision stage on the shipped model: FP16, dynamic INT8, static INT8 Q/DQ."""


import numpy as np
import onnx
import pytest

from pipeline import Pipeline
from pipeline.errors import RecipeError
from pipeline.stages.precision import weight_matmuls

from .conftest import SHIPPED_MODEL, write_recipe

pytestmark = pytest.mark.slow

QDQ = """
  - type: export
  - type: precision
    mode: int8-qdq
    target: {target}
    calibration: {{samples: 8, seq_len: 48, method: {method}}}
"""
VERIFY = """
  greedy_tokens: 8
  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("precision-cache")


def _run(tmp_path, cache, stages, name="t"):
    recipe = write_recipe(tmp_path / f"{name}.yaml", SHIPPED_MODEL, stages=stages, verify=VERIFY, name=name)
    return Pipeline.from_recipe(recipe, cache_dir=cache).run()


def test_only_weight_matmuls_are_selected(tmp_path, cache):
    result = _run(tmp_path, cache, "\n  - type: export\n")
    model = onnx.load(result.stage("export").artifact)
    inits = {i.name for i in model.graph.initializer}
    chosen = set(weight_matmuls(model, "logits", include_lm_head=False))
    layers = 4
    assert len(chosen) == 7 * layers, "q, k, v, o, gate, up, down in every layer"
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        if node.name in chosen:
            assert node.input[1] in inits and node.output[0] != "logits"
        else:  # attention scores, attention x values, the LM head: never quantized by default
            assert node.input[1] not in inits or node.output[0] == "logits"
    assert len(weight_matmuls(model, "logits", include_lm_head=True)) == 7 * layers + 1


@pytest.mark.parametrize("mode", ["int8-dynamic", "fp16"])
def test_mode_builds_and_verifies(tmp_path, cache, mode):
    result = _run(tmp_path, cache, f"\n  - type: export\n  - type: precision\n    mode: {mode}\n  - type: engine\n")
    for stage in ("precision", "engine"):
        m = result.stage(stage).verify["metrics"]
        assert result.stage(stage).verify["passed"]
        assert m["top1_agreement"] >= (0.99 if mode == "fp16" else 0.9)
    model = onnx.load(result.stage("precision").artifact)
    ops = {n.op_type for n in model.graph.node}
    if mode == "fp16":
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, "logits stay FP32"
    else:
        assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_qdq_calibration_methods_with_mixed_shapes(tmp_path, cache, method):
    """Calibration feeds a prefill and a continuation with a real past per sample: two shapes."""
    result = _run(tmp_path, cache, QDQ.format(target="cpu", method=method))
    v = result.stage("precision").verify
    assert v["passed"], v["failures"]
    model = onnx.load(result.stage("precision").artifact)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points), "u8 activations on CPU"


def test_qdq_for_tensorrt_uses_signed_symmetric_activations(tmp_path, cache):
    result = _run(tmp_path, cache, QDQ.format(target="tensorrt", method="minmax"))
    model = onnx.load(result.stage("precision").artifact)
    inits = {i.name: i for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)
    assert all(not np.any(onnx.numpy_helper.to_array(z)) for z in zps), "symmetric: zero points are 0"


def test_tensorrt_flavoured_graph_builds_an_onnxruntime_engine(tmp_path, cache):
    """ONNX Runtime verifies the signed graph; its signed-to-unsigned pass is left out of the build."""
    import json
    from pathlib import Path

    result = _run(tmp_path, cache, QDQ.format(target="tensorrt", method="minmax") + "  - type: engine\n")
    engine = result.stage("engine")
    assert engine.verify["passed"]
    session = json.loads((Path(engine.artifact).parent / "session.json").read_text())
    assert session["disabled_optimizers"] == ["QDQS8ToU8Transformer"]


def _rotary_graph(path):
    """x @ W (a weight MatMul) beside cos(inv_freq @ positions) (a rotary MatMul, as some exporters emit)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inv_freq = (1.0 / 10000 ** (np.arange(4) / 4)).astype(np.float32).reshape(1, 4, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["inv_freq", "positions"], ["freqs"], name="rotary_matmul"),
         helper.make_node("Cos", ["freqs"], ["cos"], name="cos"),
         helper.make_node("MatMul", ["x", "W"], ["y"], name="weight_matmul")],
        "rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 8]),
         helper.make_tensor_value_info("positions", TensorProto.FLOAT, [1, 1, "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 8]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, 4, "s"])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
         numpy_helper.from_array(inv_freq, "inv_freq")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)


def test_rotary_matmul_is_never_quantized_and_why(tmp_path):
    """Quantizing a rotary MatMul clips positions at the largest seen in calibration. The default
    selection takes only weight MatMuls, so positions past the calibration range stay exact."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src = tmp_path / "rotary.onnx"
    _rotary_graph(src)
    model = onnx.load(src)
    assert weight_matmuls(model, "logits", include_lm_head=False) == ["weight_matmul"]

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(1)
            self.feeds = iter([{"x": rng.standard_normal((1, 16, 8)).astype(np.float32),
                                "positions": np.arange(16, dtype=np.float32).reshape(1, 1, 16)}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    def cos_error(nodes):
        dst = tmp_path / f"q{len(nodes or [])}.onnx"
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=nodes, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        positions = np.arange(64, dtype=np.float32).reshape(1, 1, 64)  # past the calibrated 0..15
        x = np.zeros((1, 64, 8), np.float32)
        cos = sess.run(["cos"], {"x": x, "positions": positions})[0]
        want = np.cos(model_inv_freq() * positions)
        return float(np.abs(cos - want).max())

    def model_inv_freq():
        return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "inv_freq"))

    assert cos_error(weight_matmuls(model, "logits", False)) < 1e-6
    assert cos_error(None) > 0.5, "ONNX Runtime's default (every MatMul) clips the positions"


def test_calibration_text_too_short(tmp_path, cache):
    stages = "\n  - type: export\n  - type: precision\n    mode: int8-qdq\n    calibration: {samples: 4000, seq_len: 512}\n"
    with pytest.raises(RecipeError, match="enough for .* windows of 512; asked for 4000"):
        _run(tmp_path, cache, stages)


def test_calibration_text_missing(tmp_path, cache):
    stages = ("\n  - type: export\n  - type: precision\n    mode: int8-qdq\n"
              "    calibration: {text: nowhere.txt}\n")
    with pytest.raises(RecipeError, match="nowhere.txt does not exist"):
        _run(tmp_path, cache, stages)
