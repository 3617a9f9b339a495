"""Per-architecture knowledge, one small entry per model family.

An entry says how to read the KV-cache geometry from a Hugging Face config. The export
wrapper itself is family-neutral (it drives the model through transformers' cache API), so
adding a family is adding an entry here and a parity test for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ModelError


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    family: str
    # KV cache tensors are [batch, kv_heads, sequence, head_dim] in every family listed here.

    def geometry(self, config: dict[str, Any]) -> KVGeometry:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return KVGeometry(
            num_layers=config["num_hidden_layers"],
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=config["vocab_size"],
        )


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "LLaMA"),
    )
}


def arch_for(config: dict[str, Any], where: str) -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: {known}. "
            "To add a family, add an ArchSpec entry to pipeline/arch.py and a parity test for it."
        )
    return ARCHS[model_type]
