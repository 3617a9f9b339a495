"""PyTorch eager reference: the Hugging Face model as the user would run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import CausalLMRunner


def load_hf_causal_lm(path: Path, trust_remote_code: bool = False, task: str = "causal-lm"):
    """Model (float32, eval mode) and tokenizer from a local folder; weights from safetensors only."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    model = auto.from_pretrained(
        path,
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=True,
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    return model, tokenizer


def load_hf_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


class TorchLM(CausalLMRunner):
    name = "pytorch-eager"

    def __init__(self, model: Any, threads: int | None = None):
        import torch

        self.model = model
        self.torch = torch
        self.threads = threads

    def empty_past(self, batch: int) -> Any:
        return None

    def forward(self, input_ids, attention_mask, position_ids, past):
        torch = self.torch
        if past is None:
            from transformers import DynamicCache

            past = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(np.ascontiguousarray(input_ids)),
                attention_mask=torch.from_numpy(np.ascontiguousarray(attention_mask)),
                position_ids=torch.from_numpy(np.ascontiguousarray(position_ids)),
                past_key_values=past,
                use_cache=True,
            )
        return out.logits.float().numpy(), out.past_key_values

    def generate(self, prompt, new_tokens):
        torch = self.torch
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return super().generate(prompt, new_tokens)
        finally:
            torch.set_num_threads(previous)
