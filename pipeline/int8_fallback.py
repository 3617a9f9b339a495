"""Which weight MatMuls an INT8 graph keeps in FP32, chosen by measurement.

Real LLMs have a few layers whose inputs carry huge outliers: SmolLM2-135M's down_proj inputs reach
3,087 in layer 11 and 2,372 in layer 28 against a median near 7 (measured on held-out text). One INT8
scale per tensor cannot hold both those and the ordinary values, and the whole model's next-token
distribution follows (KL 0.49 with every MatMul in INT8, 0.06 with the down projections kept in FP32).

So the precision stage ranks the weight MatMuls by the relative error INT8 puts on each one's output,
measured on calibration windows with the scheme the graph uses (for per-tensor activations it follows the
input's crest factor, max |x| / RMS; per token, the weights' and the within-token outliers), quantizes, measures the KL of the INT8 graph against the FP32 graph on those windows, and
keeps the top-ranked MatMuls in FP32 in growing steps (1, 2, 4, ... up to `max_layers`) until the KL
is within `max_kl_mean`. The measurement uses calibration text, never the held-out text the stage's
gate is checked on. Every attempt is recorded in the stage's metadata and report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .activation_capture import capture_inputs


def fake_int8(x: np.ndarray, per_token: bool) -> np.ndarray:
    """Symmetric INT8 round trip of activations [rows, K]: one scale per row, or one for all."""
    amax = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max(keepdims=True)
    scale = np.maximum(amax, 1e-8) / 127.0
    return np.round(x / scale) * scale


def input_stats(src: Path, io: dict[str, Any], nodes: list[str], windows: np.ndarray, scratch: Path,
                per_token: bool, weight_qmax: int = 127, threads: int = 0) -> dict[str, dict[str, float]]:
    """For each of `nodes` (weight MatMul names), over prefills of `windows`:

    - `output_error`: the relative squared error INT8 puts on the MatMul's output, ||Y_int8 - Y||^2 / ||Y||^2,
      with the scheme the graph will use (weights per output channel; activations per token or per tensor).
      This is what the fallback ranks by: it sees both the activation's outliers and the weight's.
    - `absmax`, `rms`, `crest` (max |x| / RMS) of its input: one INT8 scale per tensor spends its 255 steps
      on the largest value, so the crest factor says how coarse the grid is for the ordinary values."""
    import onnx
    from onnx import numpy_helper

    from .int8_per_token import weight_int8

    model = onnx.load(str(src), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    tensors = sorted({by_name[n].input[0] for n in nodes})
    absmax = dict.fromkeys(tensors, 0.0)
    squares = dict.fromkeys(tensors, 0.0)
    count = dict.fromkeys(tensors, 0)
    rows: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for values in capture_inputs(src, io, tensors, windows, scratch, threads):
        for name, value in values.items():
            absmax[name] = max(absmax[name], float(np.abs(value).max()))
            squares[name] += float(np.square(value.astype(np.float64)).sum())
            count[name] += value.size
            rows[name].append(value.astype(np.float32))
    inputs = {t: np.concatenate(r) for t, r in rows.items()}
    quantized = {t: fake_int8(x, per_token) for t, x in inputs.items()}
    stats = {}
    for n in nodes:
        t = by_name[n].input[0]
        w = numpy_helper.to_array(inits[by_name[n].input[1]], base_dir=str(src.parent)).astype(np.float32)
        q, scale = weight_int8(w, weight_qmax)
        y = inputs[t] @ w
        y_int8 = quantized[t] @ (q.astype(np.float32) * scale)
        error = float(np.square(y_int8 - y).sum() / max(float(np.square(y).sum()), 1e-30))
        rms = (squares[t] / max(count[t], 1)) ** 0.5
        stats[n] = {"output_error": error, "absmax": absmax[t], "rms": rms, "crest": absmax[t] / max(rms, 1e-12)}
    return stats


def choose_fp32(quantize: Callable[[list[str]], Path], measure: Callable[[Path], float], nodes: list[str],
                ranking: dict[str, float], max_kl_mean: float, max_layers: int,
                say: Callable[[str], None] = lambda msg: None) -> tuple[list[str], list[dict[str, Any]], Path]:
    """Keep the top-ranked nodes in FP32 in steps of 0, 1, 2, 4, ... until `measure` (KL of the quantized
    graph against FP32) is within `max_kl_mean`, or `max_layers` are kept. Returns the kept nodes, every
    attempt, and the path of the graph chosen (the last one tried)."""
    order = sorted(nodes, key=lambda n: ranking.get(n, 0.0), reverse=True)
    steps = [0] + [k for k in (1, 2, 4, 8, 16, 32, 64) if k < max_layers] + [max_layers]
    steps = sorted(set(s for s in steps if s <= min(max_layers, len(nodes))))
    trials: list[dict[str, Any]] = []
    path = Path()
    kept: list[str] = []
    for k in steps:
        kept = order[:k]
        path = quantize([n for n in nodes if n not in kept])
        kl = measure(path)
        trials.append({"kept_fp32": k, "calibration_kl_mean": kl,
                       "largest_rank_quantized": ranking.get(order[k], 0.0) if k < len(order) else None})
        say(f"INT8 with {k} weight MatMuls kept in FP32: KL {kl:.4g} on calibration windows")
        if kl <= max_kl_mean:
            break
    return kept, trials, path


def name_matmuls(src: Path, model_dir: Path, nodes: list[str]) -> dict[str, str]:
    """The Hugging Face module name of each MatMul node in `nodes`, matched by the exact bytes of its weight
    against the model folder's safetensors (read one tensor at a time; no model is loaded)."""
    if not nodes:
        return {}
    import onnx
    from onnx import numpy_helper
    from safetensors import safe_open

    from .lowering import _weight_key

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    wanted = {n.name: n for n in model.graph.node if n.name in set(nodes) and len(n.input) > 1
              and n.input[1] in inits}
    by_key = {_weight_key(numpy_helper.to_array(inits[n.input[1]], base_dir=str(src.parent))): name
              for name, n in wanted.items()}
    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not key.endswith(".weight"):
                    continue
                tensor = f.get_tensor(key)
                if tensor.dim() != 2:
                    continue
                node = by_key.get(_weight_key(tensor.float().numpy().T))
                if node is not None:
                    out[node] = key.removesuffix(".weight")
    return out
