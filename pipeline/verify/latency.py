"""Latency of a runner: warm-up generations, then repeated timed generations.

Per-step decode times are pooled over the repeats for the percentiles; prefill time and
decode throughput are medians over the repeats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..runtime.base import CausalLMRunner
from .settings import LatencySpec


def latency_prompt(tokenizer: Any, text: str, tokens: int) -> np.ndarray:
    """The first `tokens` tokens of a text, repeated if the text is shorter."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError("latency text encodes to no tokens")
    while len(ids) < tokens:
        ids = ids + ids
    return np.array([ids[:tokens]], dtype=np.int64)


def measure_latency(runner: CausalLMRunner, prompt: np.ndarray, spec: LatencySpec) -> dict[str, Any]:
    for _ in range(spec.warmup):
        runner.generate(prompt, spec.decode_tokens)
    steps: list[float] = []
    prefill: list[float] = []
    decode_totals: list[float] = []
    for _ in range(spec.repeats):
        trace = runner.generate(prompt, spec.decode_tokens)
        prefill.append(trace.prefill_s)
        steps.extend(trace.step_s)
        decode_totals.append(sum(trace.step_s))
    out: dict[str, Any] = {
        "prompt_tokens": int(prompt.shape[1]),
        "decode_tokens": spec.decode_tokens,
        "repeats": spec.repeats,
        "prefill_ms": float(np.median(prefill) * 1e3),
    }
    if steps:
        p50, p90, p99 = np.percentile(np.array(steps) * 1e3, [50, 90, 99])
        out.update(
            decode_step_ms_p50=float(p50),
            decode_step_ms_p90=float(p90),
            decode_step_ms_p99=float(p99),
            decode_tokens_per_s=float((spec.decode_tokens - 1) / np.median(decode_totals)),
        )
    return out
