"""Rewriting a graph's weights one tensor at a time (pipeline/onnx_stream.py): what is written reads back
exactly, what is carried is unchanged, and offsets are aligned."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from pipeline.onnx_files import EXTERNAL_DATA, MODEL, save_model  # noqa: E402
from pipeline.onnx_stream import ALIGN, GraphWeights, WeightWriter  # noqa: E402


def _graph(tmp_path, external: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {"a": rng.normal(size=(40, 30)).astype(np.float32), "b": rng.normal(size=(30, 20)).astype(np.float32),
         "tiny": np.arange(3, dtype=np.int64)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"], name="m1"), helper.make_node("MatMul", ["h", "b"], ["y"], name="m2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    src = tmp_path / "src" / MODEL
    src.parent.mkdir()
    save_model(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)]), src, external)
    return src, w


@pytest.mark.parametrize("external", [True, False])
def test_written_and_carried_weights_read_back_exactly(tmp_path, external):
    from onnx import numpy_helper

    src, w = _graph(tmp_path, external)
    graph = GraphWeights(src)
    inits = graph.initializers()
    assert all(np.array_equal(graph.array(inits[k]), v) for k, v in w.items())  # read one at a time
    with pytest.raises(ValueError, match="over the file they are read from"):
        WeightWriter(src.parent, external, graph)
    writer = WeightWriter(tmp_path / "dst", external, graph)
    doubled = writer.tensor(graph.array(inits["a"]) * 2, "a2")
    graph.model.graph.initializer.remove(inits["a"])
    graph.model.graph.initializer.append(doubled)
    graph.model.graph.node[0].input[1] = "a2"
    path = writer.save(graph.model, graph)
    graph.close()
    out = onnx.load(str(path))
    got = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert np.array_equal(got["a2"], w["a"] * 2) and np.array_equal(got["b"], w["b"])
    assert np.array_equal(got["tiny"], w["tiny"]) and "a" not in got
    assert (path.parent / EXTERNAL_DATA).is_file() == external
    if external:
        light = onnx.load(str(path), load_external_data=False)
        offsets = [int(e.value) for i in light.graph.initializer for e in i.external_data if e.key == "offset"]
        assert len(offsets) == 2 and all(o % ALIGN == 0 for o in offsets)
        ort = pytest.importorskip("onnxruntime")
        x = np.ones((1, 40), np.float32)
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, (x @ (w["a"] * 2)) @ w["b"], rtol=1e-5)
