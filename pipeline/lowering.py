"""Lowering a weight-quantized model into ONNX with its own integers.

The quantize stage leaves, for each Linear layer, unsigned integers q [N, K], scales and zero
points per group of K. The exported graph multiplies by the dequantized weight W^T [K, N]. Each
weight MatMul is matched to its layer by the exact bytes of that initializer, and replaced by:

- `com.microsoft.MatMulNBits` (ONNX Runtime): q packed two per byte along K, low nibble
  first, [N, K/g, g/2]; scales [N * K/g]; zero points packed the same way, [N, ceil(K/g / 2)];
- or a blocked `DequantizeLinear` (opset 21, uint4, block along K) feeding the MatMul, the
  form TensorRT reads.

Nothing is re-quantized: the lowered graph computes with exactly the integers the quantize stage
chose, which is why it is verified against the quantized PyTorch model at FP32 tolerances.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StageError


def _weight_key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def load_qparams(entry_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import json

    from safetensors.numpy import load_file

    info = json.loads((entry_path / "quantization.json").read_text())
    return info, load_file(str(entry_path / "qparams.safetensors"))


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int) -> np.ndarray:
    scale = np.repeat(scales.astype(np.float32), group, axis=1)
    zero = np.repeat(zeros.astype(np.float32), group, axis=1)
    return (q.astype(np.float32) - zero) * scale


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis, low nibble first (pads an odd count with 0)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] & 0x0F | (values[..., 1::2] & 0x0F) << 4).astype(np.uint8)


def lower_int4(model, info: dict[str, Any], params: dict[str, np.ndarray], fmt: str,
               accuracy_level: int = 0) -> dict[str, Any]:
    """Rewrite `model` (an onnx ModelProto) in place; return what was lowered."""
    from onnx import TensorProto, helper, numpy_helper

    if info["bits"] != 4:
        raise StageError(f"INT4 lowering needs a 4-bit quantize stage; this one has {info['bits']} bits")
    by_key: dict[str, dict[str, Any]] = {}
    for layer in info["layers"]:
        name, group = layer["name"], layer["group"]
        q, s, z = params[f"{name}.qweight"], params[f"{name}.scales"], params[f"{name}.zeros"]
        if fmt == "matmulnbits" and (group < 16 or group & (group - 1)):
            raise StageError(f"MatMulNBits needs a power-of-two group of at least 16; layer {name} has {group}; "
                             "quantize with group_size 32, 64 or 128")
        by_key[_weight_key(dequantize(q, s, z, group).T)] = {"name": name, "q": q, "s": s, "z": z, "group": group}

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    lowered, new_nodes, unused = [], [], set()
    for node in model.graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        match = None
        if b in inits and len(inits[b].dims) == 2:
            match = by_key.get(_weight_key(numpy_helper.to_array(inits[b])))
        if match is None:
            new_nodes.append(node)
            continue
        q, s, z, group = match["q"], match["s"], match["z"], match["group"]
        n, k = q.shape
        blocks = k // group
        prefix = f"{match['name']}.int4"
        if fmt == "matmulnbits":
            packed = _pack_nibbles(q.reshape(n, blocks, group))
            zp = _pack_nibbles(z).reshape(-1)
            model.graph.initializer.extend([
                numpy_helper.from_array(packed, prefix + ".qweight"),
                numpy_helper.from_array(s.astype(np.float32).reshape(-1), prefix + ".scales"),
                numpy_helper.from_array(zp, prefix + ".zeros")])
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], prefix + ".qweight", prefix + ".scales", prefix + ".zeros"],
                list(node.output), name=(node.name or prefix) + "_nbits", domain="com.microsoft",
                K=k, N=n, bits=4, block_size=group, accuracy_level=accuracy_level))
        else:
            # weight [K, N] blocked along K (axis 0): q^T, one scale / zero per (block, column)
            qt = np.ascontiguousarray(q.T)
            w = helper.make_tensor(prefix + ".qweight", TensorProto.UINT4, [k, n], qt.reshape(-1).tolist())
            zt = helper.make_tensor(prefix + ".zeros", TensorProto.UINT4, [blocks, n],
                                    np.ascontiguousarray(z.T).reshape(-1).tolist())
            model.graph.initializer.extend([w, numpy_helper.from_array(np.ascontiguousarray(s.T.astype(np.float32)),
                                                                       prefix + ".scales"), zt])
            dq_out = prefix + ".dequantized"
            new_nodes.append(helper.make_node("DequantizeLinear", [prefix + ".qweight", prefix + ".scales",
                                                                   prefix + ".zeros"], [dq_out],
                                              name=prefix + "_dq", axis=0, block_size=group))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], dq_out], list(node.output), name=node.name))
        lowered.append(match["name"])
        assert b is not None  # a match is only found for a MatMul's weight input
        consumers[b] -= 1
        if consumers[b] == 0:
            unused.add(b)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [i for i in model.graph.initializer if i.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if fmt == "matmulnbits" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    missing = sorted({m["name"] for m in by_key.values()} - set(lowered))
    return {"lowered": lowered, "not_found": missing, "format": fmt}
