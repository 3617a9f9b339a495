"""Per-token dynamic INT8 and in-graph smoothing, on a small graph against numpy."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline.int8_per_token import quantize_per_token, weight_int8  # noqa: E402
from pipeline.int8_smoothing import smoothing_factors  # noqa: E402
from pipeline.onnx_files import save_model  # noqa: E402


def two_matmuls(w1: np.ndarray, w2: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k = w1.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The same arithmetic in numpy: per-token symmetric activations, per-channel symmetric weights."""
    scale = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127.0
    xq = np.round(x / scale)
    q, ws = weight_int8(w, 127)
    return (xq.astype(np.float64) @ q.astype(np.float64)) * scale * ws


@pytest.mark.parametrize("unsigned,external", [(False, True), (True, True), (False, False)])
def test_per_token_graph_computes_the_integer_arithmetic_exactly(unsigned, external, tmp_path):
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(64, 32)).astype(np.float32)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 2] *= 300.0  # one token with a massive activation: per token, the other tokens keep their grid
    save_model(two_matmuls(w1, w2), tmp_path / "src" / "model.onnx", external) if (tmp_path / "src").mkdir() is None \
        else None
    dst = tmp_path / "dst" / "model.onnx"
    info = quantize_per_token(tmp_path / "src" / "model.onnx", dst, ["mm1", "mm2"], external, unsigned_weights=unsigned)
    assert (dst.parent / "model.onnx.data").is_file() == external  # written tensor by tensor beside the graph
    model = onnx.load(str(dst))
    assert info == {"matmuls": 2, "activation_quantizers": 1, "weight_qmax": 127,
                    "weights": "uint8" if unsigned else "int8"}
    types = [n.op_type for n in model.graph.node]
    assert types.count("MatMulInteger") == 2 and types.count("ReduceMax") == 1  # the input quantized once
    y1, y2 = run(model, x)
    np.testing.assert_allclose(y1, reference(x, w1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y2, reference(x, w2), rtol=1e-5, atol=1e-4)
    ordinary = np.ones(x.shape[:2], bool)
    ordinary[0, 2] = False
    rel = np.abs(y1 - x @ w1)[ordinary].max() / np.abs(x @ w1)[ordinary].max()
    assert rel < 0.03  # the massive token did not coarsen the others


def test_smoothing_factors_move_outliers_and_leave_silent_channels():
    act = np.array([100.0, 1.0, 0.0], np.float32)
    weight = np.array([1.0, 1.0, 1.0], np.float32)
    f = smoothing_factors(act, weight, 0.5)
    assert f[0] == pytest.approx(10.0) and f[1] == pytest.approx(1.0) and f[2] == 1.0
    assert (act / f)[0] == pytest.approx(10.0)  # the outlier channel's range shrinks by sqrt
