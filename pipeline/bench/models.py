"""Benchmark models: the shipped tiny LLaMA, and a random-weight LLaMA-shape model of about
200M parameters built from config at run time (decode is memory-bound at that size)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

LARGE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_large_llama(folder: Path, say: Callable[[str], None]) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    say("building the random-weight ~200M LLaMA (seed 0)")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LARGE)).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shipped = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"
    for name in TOKENIZER_FILES:
        shutil.copy(shipped / name, tmp / name)
    tmp.rename(folder)
    return folder


def model_weight_bytes(engine: Any) -> int:
    """Bytes a batch-1 decode step reads: the engine's weights less the FP32 embedding table, of which
    a step reads one row."""
    cfg = json.loads((engine.model_dir / "config.json").read_text())
    return max(engine.size_bytes - cfg["vocab_size"] * cfg["hidden_size"] * 4, 0)
