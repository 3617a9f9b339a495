"""Reading the activations that enter chosen nodes of an ONNX decoder, window by window.

The graph is copied with those tensors added as outputs (its weights file linked, not copied) and run
on prefills of calibration windows with ONNX Runtime, its optimizations off so every tensor exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_files import EXTERNAL_DATA, MODEL, link_or_copy
from .runtime.base import position_ids_from_mask


def capture_inputs(src: Path, io: dict[str, Any], tensors: list[str], windows: np.ndarray, scratch: Path,
                   threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """For each window (a row of token ids), the value of every tensor in `tensors`, as [tokens, channels]."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    scratch.mkdir(parents=True, exist_ok=True)
    if (src.parent / EXTERNAL_DATA).is_file():  # the augmented graph reads the original's weights file
        link_or_copy(src.parent / EXTERNAL_DATA, scratch / EXTERNAL_DATA)
    onnx.save_model(model, str(scratch / MODEL))
    del model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(scratch / MODEL), sess_options=opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    past_dtype = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    try:
        for row in windows:
            ids = row[None, :].astype(np.int64)
            mask = np.ones_like(ids)
            feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask,
                                           "position_ids": position_ids_from_mask(mask)}
            for name in io.get("past_inputs", []):
                feed[name] = np.zeros((1, io["kv_heads"], 0, io["head_dim"]), dtype=past_dtype.get(name, np.float32))
            values = session.run(tensors, {k: v for k, v in feed.items() if k in wanted})
            yield {t: v.reshape(-1, v.shape[-1]) for t, v in zip(tensors, values)}
    finally:
        del session
        (scratch / MODEL).unlink(missing_ok=True)
        (scratch / EXTERNAL_DATA).unlink(missing_ok=True)
