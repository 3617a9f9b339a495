"""Verification shared by every stage whose artifact is an ONNX causal LM.

Accuracy against the PyTorch reference (prefill, padded prefill, decode with past, greedy
tokens), drift against the stage before (same inputs, both ONNX), and latency beside the
PyTorch eager baseline measured in the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StageError
from ..memory import return_freed_memory
from ..runtime.base import position_ids_from_mask
from ..runtime.ort_lm import OrtLM, SessionSettings
from .accuracy import check_accuracy
from .latency import measure_latency
from .policy import Policy
from .result import Verification

if TYPE_CHECKING:
    from ..context import RunContext


def _padded_prefill(runner: OrtLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits, _ = runner.forward(ids, mask, position_ids_from_mask(mask), runner.empty_past(ids.shape[0]))
    return logits


def verify_onnx_lm(
    ctx: RunContext,
    policy: Policy,
    model: Path,
    io: dict[str, Any],
    settings: SessionSettings,
    parent_model: Path | None = None,
    parent_io: dict[str, Any] | None = None,
) -> Verification:
    if io.get("task", "causal-lm") == "feature-extraction":
        return verify_onnx_encoder(ctx, policy, model, settings, parent_model)
    spec = ctx.verify_spec
    ref = ctx.reference()
    baseline = ctx.baseline_latency(settings.intra_op_threads)
    ctx.release_models()  # PyTorch's outputs are kept; its weights are not held beside ONNX Runtime's
    ctx.say(f"verifying {model.name}: accuracy")
    try:
        runner = OrtLM(model, io, settings)
    except Exception as exc:  # ONNX Runtime raises its own types for invalid graphs
        raise StageError(f"ONNX Runtime cannot load {model}: {exc}") from exc
    try:
        metrics, failures = check_accuracy(runner, ref, policy)
        mine = _padded_prefill(runner, ref.b2_ids, ref.b2_mask) if parent_model is not None else None
        ctx.say(f"verifying {model.name}: latency")
        latency = measure_latency(runner, ctx.latency_prompt(), spec.latency)
    finally:
        runner.close()
        return_freed_memory()
    if parent_model is not None:  # opened after this graph's session is closed: one copy of the weights at a time
        parent = OrtLM(parent_model, parent_io or io, settings)
        try:
            theirs = _padded_prefill(parent, ref.b2_ids, ref.b2_mask)
        finally:
            parent.close()
        where = ref.b2_mask.astype(bool)
        metrics["vs_previous_stage_max_abs_diff"] = float(np.abs(mine - theirs)[where].max())
    metrics.update(latency)
    metrics["threads"] = settings.intra_op_threads
    metrics["baseline_decode_tokens_per_s"] = baseline.get("decode_tokens_per_s")
    metrics["baseline_prefill_ms"] = baseline["prefill_ms"]
    if metrics.get("decode_tokens_per_s") and baseline.get("decode_tokens_per_s"):
        metrics["decode_speedup_vs_baseline"] = metrics["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
    return Verification(passed=not failures, metrics=metrics, failures=failures)


def verify_onnx_encoder(ctx: RunContext, policy: Policy, model: Path, settings: SessionSettings,
                        parent_model: Path | None) -> Verification:
    from .embedding import check_embeddings, measure_encoder_latency, ort_encoder, torch_encoder

    ref = ctx.reference()
    try:
        run = ort_encoder(model, settings)
    except Exception as exc:  # ONNX Runtime raises its own types for invalid graphs
        raise StageError(f"ONNX Runtime cannot load {model}: {exc}") from exc
    ctx.say(f"verifying {model.name}: embeddings")
    metrics, failures = check_embeddings(run, ref, policy)
    spec = ctx.verify_spec
    if parent_model is not None:
        _, mine = run(ref.batch)
        _, theirs = ort_encoder(parent_model, settings)(ref.batch)
        metrics["vs_previous_stage_max_abs_diff"] = float(np.abs(mine - theirs).max())
    ctx.say(f"verifying {model.name}: latency")
    metrics.update(measure_encoder_latency(run, ref.batch, spec.latency))
    threads = settings.intra_op_threads

    def measure() -> dict:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            return measure_encoder_latency(torch_encoder(ctx.reference_model()[0], ctx.pooling()), ref.batch,
                                           spec.latency)
        finally:
            torch.set_num_threads(previous)

    baseline = ctx.baseline(("encoder", threads), measure)
    metrics["threads"] = threads
    metrics["baseline_sentences_per_s"] = baseline["sentences_per_s"]
    metrics["baseline_batch_ms_p50"] = baseline["batch_ms_p50"]
    metrics["speedup_vs_baseline"] = metrics["sentences_per_s"] / baseline["sentences_per_s"]
    return Verification(passed=not failures, metrics=metrics, failures=failures)
