"""Accuracy of a runner against the PyTorch reference.

Cases: prefill at batch 1; prefill at batch 2 with left padding (compared on real tokens
only); one decode step with a past at batch 2; greedy generation at batch 1 with the KV
cache. The reference is computed once per run and shared by every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.base import CausalLMRunner, position_ids_from_mask
from .policy import Policy
from .settings import VerifySpec


@dataclass
class Reference:
    b1_ids: np.ndarray
    b1_logits: np.ndarray
    b2_ids: np.ndarray
    b2_mask: np.ndarray
    b2_logits: np.ndarray
    next_ids: np.ndarray
    decode_logits: np.ndarray
    greedy_prompt: np.ndarray
    greedy_tokens: list[int]
    eval_windows: np.ndarray  # [n, L] held-out token windows
    eval_logprobs: np.ndarray  # [n, L, vocab] reference log-probabilities


def encode_prompts(tokenizer: Any, prompts: tuple[str, ...]) -> list[list[int]]:
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("a verification prompt encodes to no tokens")
    return encoded


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def _decode_inputs(mask: np.ndarray, next_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new_mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
    pos = position_ids_from_mask(new_mask)[:, -1:]
    return new_mask, pos


def build_reference(runner: CausalLMRunner, tokenizer: Any, spec: VerifySpec) -> Reference:
    encoded = encode_prompts(tokenizer, spec.prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    b1_ids = np.array([encoded[0]], dtype=np.int64)
    b1_mask = np.ones_like(b1_ids)
    b1_logits, _ = runner.forward(b1_ids, b1_mask, position_ids_from_mask(b1_mask), runner.empty_past(1))

    b2_ids, b2_mask = left_pad(encoded[:2], pad_id)
    b2_logits, past = runner.forward(b2_ids, b2_mask, position_ids_from_mask(b2_mask), runner.empty_past(2))
    next_ids = np.argmax(b2_logits[:, -1], axis=-1).astype(np.int64)[:, None]
    dec_mask, dec_pos = _decode_inputs(b2_mask, next_ids)
    decode_logits, _ = runner.forward(next_ids, dec_mask, dec_pos, past)

    greedy = runner.generate(b1_ids, spec.greedy_tokens)
    windows = eval_windows(tokenizer, spec)
    return Reference(b1_ids, b1_logits, b2_ids, b2_mask, b2_logits, next_ids, decode_logits, b1_ids,
                     greedy.tokens, windows, window_logprobs(runner, windows))


def eval_windows(tokenizer: Any, spec: VerifySpec) -> np.ndarray:
    """Consecutive windows from the start of the held-out text (deterministic)."""
    from ..calibration import calibration_windows

    return calibration_windows(tokenizer, spec.eval_text, spec.eval_windows, spec.eval_window_tokens, seed=0,
                               where="verify.eval").windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_logprobs(runner: CausalLMRunner, windows: np.ndarray) -> np.ndarray:
    out = []
    for row in windows:
        ids = row[None, :]
        mask = np.ones_like(ids)
        logits, _ = runner.forward(ids, mask, position_ids_from_mask(mask), runner.empty_past(1))
        out.append(log_softmax(logits[0]).astype(np.float32))
    return np.stack(out)


def distribution_metrics(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> dict[str, float]:
    """Mean KL(reference || candidate) per token, and top-1 agreement."""
    p = np.exp(ref_logprobs.astype(np.float64))
    kl = np.maximum((p * (ref_logprobs.astype(np.float64) - logprobs.astype(np.float64))).sum(-1), 0.0)
    top1 = np.argmax(ref_logprobs, -1) == np.argmax(logprobs, -1)
    return {"kl_mean": float(kl.mean()), "top1_agreement": float(top1.mean())}


def _max_abs(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if where is not None:
        diff = diff[where.astype(bool)]
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max())


def matched_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_accuracy(
    runner: CausalLMRunner, ref: Reference, spec: Policy
) -> tuple[dict[str, Any], list[str]]:
    """Metrics and the list of missed thresholds (empty when the runner passes); `spec` holds the stage's
    effective thresholds (pipeline/verify/policy.py)."""
    b1_logits, _ = runner.forward(ref.b1_ids, np.ones_like(ref.b1_ids),
                                  position_ids_from_mask(np.ones_like(ref.b1_ids)), runner.empty_past(1))
    b2_logits, past = runner.forward(ref.b2_ids, ref.b2_mask, position_ids_from_mask(ref.b2_mask),
                                     runner.empty_past(2))
    dec_mask, dec_pos = _decode_inputs(ref.b2_mask, ref.next_ids)
    decode_logits, _ = runner.forward(ref.next_ids, dec_mask, dec_pos, past)
    greedy = runner.generate(ref.greedy_prompt, len(ref.greedy_tokens))

    prefill_b1 = _max_abs(b1_logits, ref.b1_logits)
    prefill_b2 = _max_abs(b2_logits, ref.b2_logits, ref.b2_mask)
    decode = _max_abs(decode_logits, ref.decode_logits)
    matched = matched_prefix(greedy.tokens, ref.greedy_tokens)
    total = len(ref.greedy_tokens)
    top1_prefill = float(np.mean(
        np.argmax(b2_logits, -1)[ref.b2_mask.astype(bool)] == np.argmax(ref.b2_logits, -1)[ref.b2_mask.astype(bool)]
    ))
    metrics = {
        **distribution_metrics(ref.eval_logprobs, window_logprobs(runner, ref.eval_windows)),
        "prefill_max_abs_diff": max(prefill_b1, prefill_b2),
        "prefill_b1_max_abs_diff": prefill_b1,
        "prefill_b2_padded_max_abs_diff": prefill_b2,
        "decode_max_abs_diff": decode,
        "prefill_top1_agreement": top1_prefill,
        "greedy_tokens_matched": matched,
        "greedy_tokens_total": total,
    }
    failures = []
    if spec.prefill_atol is not None and not metrics["prefill_max_abs_diff"] <= spec.prefill_atol:
        failures.append(f"prefill logits differ by {metrics['prefill_max_abs_diff']:.3g} > prefill_atol "
                        f"{spec.prefill_atol:g}")
    if spec.decode_atol is not None and not decode <= spec.decode_atol:
        failures.append(f"decode logits differ by {decode:.3g} > decode_atol {spec.decode_atol:g}")
    if spec.max_kl_mean is not None and not metrics["kl_mean"] <= spec.max_kl_mean:
        failures.append(f"kl_mean {metrics['kl_mean']:.3g} on held-out text > max_kl_mean {spec.max_kl_mean:g}")
    if spec.min_top1_agreement is not None and not metrics["top1_agreement"] >= spec.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < min_top1_agreement "
                        f"{spec.min_top1_agreement:g}")
    need = int(np.ceil(spec.min_greedy_match * total))
    if matched < need:
        failures.append(f"greedy generation matched {matched}/{total} tokens before diverging; "
                        f"min_greedy_match needs {need}")
    return metrics, failures
