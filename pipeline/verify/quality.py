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


def _logprobs(ctx, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows and the next-token log-probabilities of the model in `folder`, once per run."""

    def measure() -> dict[str, Any]:
        model, tokenizer = ctx.model_at(folder)
        windows = eval_windows(tokenizer, ctx.verify_spec)
        return {"windows": windows, "logprobs": window_logprobs(TorchLM(model), windows)}

    got = ctx.baseline(("heldout-logprobs", str(folder)), measure)
    return got["windows"], got["logprobs"]


def quality_against_original(ctx, folder: Path) -> dict[str, Any]:
    """`folder` is loaded from disk (what ships), never taken from memory."""
    windows, ref = _logprobs(ctx, ctx.model_path)
    _, got = _logprobs(ctx, folder)
    ppl, ppl_ref = perplexity(got, windows), perplexity(ref, windows)
    return {**distribution_metrics(ref, got), "perplexity": ppl, "perplexity_ref": ppl_ref,
            "perplexity_change": ppl / ppl_ref - 1.0, "eval_tokens": int(windows.size)}


def agreement(ctx, reference: Path, candidate: Path) -> dict[str, float]:
    """KL(reference || candidate) and top-1 agreement between two checkpoints on the held-out windows."""
    _, ref = _logprobs(ctx, reference)
    _, got = _logprobs(ctx, candidate)
    return distribution_metrics(ref, got)
