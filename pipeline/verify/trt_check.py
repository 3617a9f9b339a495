"""Verification of a TensorRT engine (needs an NVIDIA GPU and TensorRT; never run on CPU CI).

For each optimization profile, one feed at the profile's opt shapes: a prefill (empty past)
or a decode step whose past comes from ONNX Runtime running the same ONNX graph. Polygraphy's
Comparator runs TensorRT and ONNX Runtime on the identical feed; outputs must agree within the
recipe's atol/rtol. Latency is measured with the TensorRT runner (prefill, decode step
p50/p90/p99, tokens/s) beside a PyTorch FP16 CUDA baseline, and an engine slower than that
baseline is reported as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.base import position_ids_from_mask
from ..tensorrt.profiles import DerivedProfile
from .result import Verification

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stages.engine_trt import TensorRTEngineConfig


def _tokens(ctx: RunContext, n: int) -> np.ndarray:
    prompt = ctx.latency_prompt()[0]
    while prompt.shape[0] < n:
        prompt = np.concatenate([prompt, prompt])
    return prompt[:n]


def profile_feed(ctx: RunContext, io: dict[str, Any], profile: DerivedProfile, onnx_path: Path) -> dict[str, Any]:
    """A feed at the profile's opt shapes; a non-empty past comes from ONNX Runtime's prefill."""
    from ..runtime.ort_lm import OrtLM, SessionSettings

    batch, seq = profile.axes["batch"][1], profile.axes["sequence"][1]
    past_len = profile.axes.get("past_sequence", (0, 0, 0))[1]
    ids = np.stack([_tokens(ctx, past_len + seq)] * batch).astype(np.int64)
    mask = np.ones_like(ids)
    ort = OrtLM(onnx_path, io, SessionSettings(graph_optimization_level="basic"))
    try:
        past = ort.empty_past(batch)
        if past_len:
            _, presents = ort.forward(ids[:, :past_len], mask[:, :past_len],
                                      position_ids_from_mask(mask[:, :past_len]), past)
            past = [np.asarray(p.numpy() if hasattr(p, "numpy") else p) for p in presents]
    finally:
        ort.close()
    feed = {"input_ids": ids[:, past_len:], "attention_mask": mask,
            "position_ids": position_ids_from_mask(mask, past_len)}
    feed.update(dict(zip(io["past_inputs"], past)))
    return feed


def compare_profile(plan: Path, onnx_path: Path, index: int, feed: dict[str, Any], names: list[str],
                    atol: float, rtol: float) -> tuple[dict[str, float], list[str]]:
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    runners = [TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), optimization_profile=index),
               OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))]
    results = Comparator.run(runners, data_loader=[feed])
    (_, trt_iters), (_, ort_iters) = results[0], results[1]
    metrics, failures = {}, []
    for name in names:
        got, want = np.asarray(trt_iters[0][name], np.float64), np.asarray(ort_iters[0][name], np.float64)
        diff = np.abs(got - want)
        metrics[name] = float(diff.max())
        if not np.all(diff <= atol + rtol * np.abs(want)):
            failures.append(f"{name}: max |TensorRT - ONNX Runtime| {diff.max():.3g} exceeds atol {atol} + "
                            f"rtol {rtol} x |ONNX Runtime|")
    return metrics, failures


def verify_trt_engine(ctx: RunContext, spec: TensorRTEngineConfig, plan: Path, onnx_path: Path,
                      meta: dict[str, Any]) -> Verification:
    from ..tensorrt.profiles import DerivedProfile, InputShapes

    io = meta["io"]
    derived = [DerivedProfile(p["name"], {a: tuple(r) for a, r in p["axes"].items()},
                              {n: InputShapes(tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                               for n, s in p["inputs"].items()}) for p in meta["engine"]["profiles"]]
    names = [io["logits_output"]] + (io["present_outputs"] if spec.compare.outputs == "all" else [])
    metrics: dict[str, Any] = {"profiles": {}}
    failures: list[str] = []
    for index, profile in enumerate(derived):
        ctx.say(f"verifying the TensorRT engine: profile '{profile.name}' against ONNX Runtime")
        diffs, fails = compare_profile(plan, onnx_path, index, profile_feed(ctx, io, profile, onnx_path), names,
                                       spec.compare.atol, spec.compare.rtol)
        metrics["profiles"][profile.name] = {"logits_max_abs_diff": diffs[io["logits_output"]],
                                             "max_abs_diff": max(diffs.values())}
        failures += [f"profile '{profile.name}': {f}" for f in fails]
    notes = ["TensorRT verified against ONNX Runtime on the same ONNX graph and feeds"]
    if spec.compare.latency:
        metrics.update(_latency(ctx, spec, plan, onnx_path, io, derived, notes))
    return Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)


def _latency(ctx: RunContext, spec: TensorRTEngineConfig, plan: Path, onnx_path: Path, io: dict[str, Any],
             derived: list[DerivedProfile], notes: list[str]) -> dict[str, Any]:
    from ..runtime.trt_lm import TrtLM
    from ..tensorrt.profiles import graph_inputs
    from .latency import measure_latency

    ctx.say("timing the TensorRT engine")
    dtypes = {i.name: i.dtype for i in graph_inputs(onnx_path)}
    past_dtype = np.float16 if io["past_inputs"] and dtypes.get(io["past_inputs"][0]) == "FLOAT16" else np.float32
    runner = TrtLM(plan, io, derived, past_dtype)
    try:
        latency = measure_latency(runner, ctx.latency_prompt(), ctx.verify_spec.latency)
    except ValueError as exc:  # the latency prompt or decode length fits no profile
        notes.append(f"latency not measured: {exc}")
        return {}
    finally:
        runner.close()
    if spec.compare.fp16_baseline:
        base = ctx.baseline(("cuda-fp16",), lambda: _fp16_baseline(ctx))
        latency["baseline"] = "pytorch-fp16-cuda"
        latency["baseline_decode_tokens_per_s"] = base["decode_tokens_per_s"]
        latency["decode_speedup_vs_baseline"] = latency.get("decode_tokens_per_s", 0) / base["decode_tokens_per_s"]
        if latency["decode_speedup_vs_baseline"] < 1:
            notes.append(f"this engine decodes SLOWER than PyTorch FP16 on the same GPU "
                         f"({latency['decode_speedup_vs_baseline']:.2f}x)")
    return latency


def _fp16_baseline(ctx: RunContext) -> dict[str, Any]:
    from ..bench.worker import TorchEngine

    spec = ctx.verify_spec.latency
    engine = TorchEngine({"path": str(ctx.source_path), "threads": 1, "device": "cuda"})
    prompt = ctx.latency_prompt()
    for _ in range(spec.warmup):
        engine.decode(prompt, spec.decode_tokens)
    steps = []
    for _ in range(spec.repeats):
        steps += engine.decode(prompt, spec.decode_tokens)["steps_s"]
    return {"decode_tokens_per_s": float(1.0 / np.median(steps))}
