"""Verification of sentence-embedding encoders (BERT family).

The reference is PyTorch's last hidden state and its pooled, normalized sentence embedding
for the recipe's sentence pairs (one padded batch). A stage passes when every sentence's
embedding has cosine similarity to PyTorch's of at least `min_cosine`, the hidden states
differ by at most `prefill_atol` on real tokens (when set), and the pairs keep their
similarity ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .policy import Policy
from .settings import LatencySpec, VerifySpec

Batch = dict[str, np.ndarray]


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: dict[str, Any]) -> np.ndarray:
    if pooling["mode"] == "cls":
        emb = hidden[:, 0]
    else:
        m = mask[..., None].astype(hidden.dtype)
        emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    if pooling["normalize"]:
        emb = emb / np.clip(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12, None)
    return emb


def encode(tokenizer: Any, sentences: list[str], input_names: list[str]) -> Batch:
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in input_names if k in enc}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _pair_sims(emb: np.ndarray) -> np.ndarray:
    return _cos(emb[0::2], emb[1::2])


@dataclass
class EmbeddingReference:
    batch: Batch
    hidden: np.ndarray
    embeddings: np.ndarray
    pair_sims: np.ndarray


def encoder_inputs(model: Any) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def torch_encoder(model: Any, pooling: dict[str, Any]) -> Callable[[Batch], tuple[np.ndarray, np.ndarray]]:
    import torch

    def run(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        hidden = out.last_hidden_state.float().numpy()
        return hidden, pool(hidden, batch["attention_mask"], pooling)

    return run


def ort_encoder(model_path: Path, settings) -> Callable[[Batch], tuple[np.ndarray, np.ndarray]]:
    session = settings.open(model_path)

    def run(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        hidden, emb = session.run(["last_hidden_state", "sentence_embedding"], batch)
        return hidden.astype(np.float32), emb.astype(np.float32)

    return run


def build_embedding_reference(model: Any, tokenizer: Any, pooling: dict[str, Any],
                              spec: VerifySpec) -> EmbeddingReference:
    sentences = [s for pair in spec.sentence_pairs for s in pair]
    batch = encode(tokenizer, sentences, encoder_inputs(model))
    hidden, emb = torch_encoder(model, pooling)(batch)
    return EmbeddingReference(batch, hidden, emb, _pair_sims(emb))


def check_embeddings(run: Callable[[Batch], tuple[np.ndarray, np.ndarray]], ref: EmbeddingReference,
                     spec: Policy) -> tuple[dict[str, Any], list[str]]:
    hidden, emb = run(ref.batch)
    real = ref.batch["attention_mask"].astype(bool)
    hidden_diff = float(np.abs(hidden - ref.hidden)[real].max())
    cos = _cos(emb, ref.embeddings)
    sims = _pair_sims(emb)
    ranking = bool(np.array_equal(np.argsort(-sims), np.argsort(-ref.pair_sims)))
    metrics = {
        "hidden_max_abs_diff": hidden_diff,
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
        "pair_similarity_max_abs_diff": float(np.abs(sims - ref.pair_sims).max()),
        "pair_ranking_preserved": ranking,
        "sentences": len(emb),
    }
    failures = []
    if spec.prefill_atol is not None and not hidden_diff <= spec.prefill_atol:
        failures.append(f"hidden states differ by {hidden_diff:.3g} > prefill_atol {spec.prefill_atol:g}")
    if not metrics["embedding_cosine_min"] >= spec.min_cosine:
        failures.append(f"an embedding has cosine {metrics['embedding_cosine_min']:.5f} to PyTorch's "
                        f"< min_cosine {spec.min_cosine:g}")
    if spec.require_pair_ranking and not ranking:
        failures.append("the similarity ranking of the sentence pairs changed")
    return metrics, failures


def measure_encoder_latency(run: Callable[[Batch], Any], batch: Batch, spec: LatencySpec) -> dict[str, Any]:
    for _ in range(spec.warmup):
        run(batch)
    times = []
    for _ in range(max(spec.repeats * 4, 8)):
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    n = int(batch["input_ids"].shape[0])
    return {"batch_ms_p50": float(p50), "batch_ms_p90": float(p90), "batch_ms_p99": float(p99),
            "sentences_per_s": float(n / (np.median(times))), "batch_size": n,
            "sequence_length": int(batch["input_ids"].shape[1])}
