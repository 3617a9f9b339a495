"""bitsandbytes: LLM.int8() and 4-bit NF4/FP4 for the PyTorch runtime.

transformers quantizes the weights while loading (bitsandbytes runs on x86-64 CPUs since 0.47)
and saves a checkpoint that transformers loads back. Nothing here goes to ONNX: NF4/FP4 are
codebooks and LLM.int8() splits outlier columns at run time, and no ONNX operator does either.

The checkpoint is saved before the model runs anything: a 4-bit model saved after a CPU forward
pass was measured to reload with corrupted weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def quantize_with_bitsandbytes(source: Path, out: Path, kind: str, double_quant: bool, exclude: tuple[str, ...],
                               trust_remote_code: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = list(exclude)
    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 local_files_only=True, use_safetensors=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(out, safe_serialization=True)  # before any forward pass
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer.save_pretrained(out)
    layers = []
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            layers.append({"name": name, "in": module.in_features, "out": module.out_features,
                           "kind": type(module).__name__})
    del model
    return {"quantize_seconds": seconds, "library": "bitsandbytes", "layers": layers}


def build(job):
    """The quantize stage's bitsandbytes method (pipeline/quant/methods.py): a checkpoint, nothing to export."""
    from .methods import QuantOutcome

    cfg = job.cfg
    got = quantize_with_bitsandbytes(job.source, job.out / "checkpoint", cfg.bnb_type, bool(cfg.double_quant),
                                     cfg.exclude, job.trust_remote_code)
    return QuantOutcome(got["quantize_seconds"], got["layers"],
                        info={"bnb_type": cfg.bnb_type, "double_quant": cfg.double_quant, "library": got["library"]})
