"""Quality of a quantized PyTorch checkpoint against the original model, on held-out text:
perplexity of each, its relative change, mean KL of next-token distributions, top-1 agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.torch_lm import TorchLM
from .accuracy import distribution_metrics, eval_windows, window_logprobs


def perplexity(logprobs: np.ndarray, windows: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of each window's next tokens."""
    nll = -np.take_along_axis(logprobs[:, :-1].astype(np.float64), windows[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


def quality_against_original(ctx, folder: Path) -> dict[str, Any]:
    """`folder` is loaded from disk (what ships), never taken from memory."""
    original, tokenizer = ctx.original_model()
    candidate, _ = ctx.model_at(folder)
    windows = eval_windows(tokenizer, ctx.verify_spec)
    ref = window_logprobs(TorchLM(original), windows)
    got = window_logprobs(TorchLM(candidate), windows)
    ppl, ppl_ref = perplexity(got, windows), perplexity(ref, windows)
    return {**distribution_metrics(ref, got), "perplexity": ppl, "perplexity_ref": ppl_ref,
            "perplexity_change": ppl / ppl_ref - 1.0, "eval_tokens": int(windows.size)}
