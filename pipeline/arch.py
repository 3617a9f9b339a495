"""Per-architecture knowledge, one small entry per model family.

An entry says how to read the KV-cache geometry from a Hugging Face config. The export
wrapper itself is family-neutral (it drives the model through transformers' cache API), so
adding a family is adding an entry here and a parity test for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

# the files of a Hugging Face model folder that define the model besides its weights
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt")


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class ArchSpec:
    """How to read one family's config. KV tensors are [batch, kv_heads, sequence, head_dim]."""

    model_type: str
    family: str
    layers: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    hidden: str = "hidden_size"
    kv_heads: str | None = "num_key_value_heads"  # None: plain multi-head attention
    positions: str = "rotary"  # how the family encodes positions (documentation for the support table)
    task: str = "causal-lm"  # or "feature-extraction" (encoders: pooled sentence embeddings, no KV cache)

    def geometry(self, config: dict[str, Any]) -> KVGeometry:
        heads = config[self.heads]
        head_dim = config.get("head_dim") or config[self.hidden] // heads
        kv_heads = (config.get(self.kv_heads) if self.kv_heads else None) or heads
        return KVGeometry(num_layers=config[self.layers], kv_heads=kv_heads, head_dim=head_dim,
                          vocab_size=config["vocab_size"])


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "LLaMA"),
        ArchSpec("mistral", "Mistral"),
        ArchSpec("qwen2", "Qwen2"),
        ArchSpec("qwen3", "Qwen3"),
        ArchSpec("phi3", "Phi-3"),
        ArchSpec("phi", "Phi-1/2", positions="partial rotary"),
        ArchSpec("gemma2", "Gemma 2"),
        ArchSpec("gemma3_text", "Gemma 3 (text)"),
        ArchSpec("olmo2", "OLMo 2"),
        ArchSpec("granite", "Granite"),
        ArchSpec("stablelm", "StableLM", positions="partial rotary"),
        ArchSpec("gpt_neox", "GPT-NeoX", kv_heads=None, positions="partial rotary"),
        ArchSpec("gpt2", "GPT-2", layers="n_layer", heads="n_head", hidden="n_embd", kv_heads=None,
                 positions="learned"),
        ArchSpec("bert", "BERT (encoder)", kv_heads=None, positions="learned", task="feature-extraction"),
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


# Families run end to end on a real pretrained model, with the precisions that passed there and the test.
REAL_MODELS = {
    "llama": "SmolLM2-135M-Instruct: FP32, FP16, RTN INT4 (`tests/test_smollm2.py`)",
    "bert": "all-MiniLM-L6-v2: FP32, INT8, FP16 (`tests/test_minilm.py`)",
}
# Families whose INT4 lowering (the quantize stage's integers as MatMulNBits) is tested, and on what.
INT4_TESTED = {"llama": "yes (shipped model, SmolLM2)"}


def support_table() -> str:
    """The README's support table, rendered from the registry (every entry has a parity test in
    tests/test_families.py; tests/test_readme.py checks the README carries this exact table)."""
    rows = ["| family | model_type | task | positions | export | KV cache | simplify | FP16 | INT8 (dynamic, Q/DQ) "
            "| INT4 | real pretrained model | verified on |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec in ARCHS.values():
        kv = "yes" if spec.task == "causal-lm" else "n/a (encoder)"
        real = REAL_MODELS.get(spec.model_type, "none yet: random weights only")
        int4 = INT4_TESTED.get(spec.model_type, "not yet")
        rows.append(f"| {spec.family} | `{spec.model_type}` | {spec.task} | {spec.positions} | yes | {kv} | yes "
                    f"| yes | yes | {int4} | {real} | ONNX Runtime CPU, against PyTorch eager |")
    return "\n".join(rows)


def sentence_pooling(folder: Path) -> dict[str, Any]:
    """How sentence embeddings are pooled: from a sentence-transformers layout, else mean + no norm."""
    mode, normalize = "mean", False
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        cfg = json.loads(pooling_config.read_text())
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            raise ModelError(f"{pooling_config}: only mean or CLS pooling is supported")
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return {"mode": mode, "normalize": normalize}
