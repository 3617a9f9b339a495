"""Sizes of a decoder from its config alone: parameters, weights per precision, KV cache.

Used by `plan` for models whose weights are not on this machine (a 7B recipe planned on a
laptop) and for the GPU-memory estimate of a TensorRT engine. Counts follow the LLaMA layout
(attention q/k/v/o, gated MLP, two norms per layer); other decoder families differ by a few
percent (biases, an ungated MLP), which an estimate tolerates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    linear: int  # every weight matrix inside the layers (what quantization touches)
    other: int  # norms

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.other


def parameter_count(config: dict[str, Any], geometry: dict[str, int]) -> ParameterCount:
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    inter = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    layers, kv_heads, head_dim = geometry["num_layers"], geometry["kv_heads"], geometry["head_dim"]
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    vocab = geometry["vocab_size"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter  # gate, up, down
    tied = bool(config.get("tie_word_embeddings", False))
    return ParameterCount(embedding=vocab * hidden, lm_head=0 if tied else vocab * hidden,
                          linear=layers * (attention + mlp), other=layers * 2 * hidden + hidden)


def weight_bytes(params: ParameterCount, precision: str) -> int:
    """Every weight in one precision (the plain 'model in fp16' figure)."""
    return int(params.total * BYTES[precision])


def engine_weight_bytes(params: ParameterCount, precision_mode: str | None, quantize_lm_head: bool = False,
                        group_size: int = 128) -> int:
    """Weights as this project's precision stage leaves them: INT8/INT4 only on the layers' weight
    MatMuls (plus per-channel or per-group FP32 scales), embedding in FP32, the LM head quantized
    only on request."""
    fp32 = BYTES["fp32"]
    if precision_mode is None:
        return int(params.total * fp32)
    if precision_mode == "fp16":
        return int(params.total * BYTES["fp16"])
    low = BYTES["int4"] if precision_mode == "int4" else BYTES["int8"]
    scales = fp32 / group_size if precision_mode == "int4" else 0.0
    head = params.lm_head * (low + scales if quantize_lm_head else fp32)
    return int(params.linear * (low + scales) + params.embedding * fp32 + head + params.other * fp32)


def kv_cache_bytes(geometry: dict[str, int], seq_len: int, batch: int, bytes_per_value: float) -> int:
    """2 (keys and values) x layers x kv_heads x head_dim x seq_len x batch x bytes."""
    return int(2 * geometry["num_layers"] * geometry["kv_heads"] * geometry["head_dim"] * seq_len * batch
               * bytes_per_value)


def gb(n: float) -> str:
    """Decimal gigabytes, as GPU memory is usually quoted (megabytes below 1 GB)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
