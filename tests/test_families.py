"""Parity for every family in the registry: tiny random models built from config at test time,
taken through export, simplify and the ONNX Runtime engine, each verified against PyTorch
(prefill, padded prefill, decode with past, greedy tokens through the KV cache)."""

import shutil

import pytest

from pipeline import Pipeline
from pipeline.arch import ARCHS

from .conftest import SHIPPED_MODEL, TOKENIZER_FILES, write_recipe

pytestmark = pytest.mark.slow

COMMON = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# (model_type, config class, overrides). The prompts are longer than every sliding window
# below, and greedy decoding runs past it, so windowed attention is exercised.
VARIANTS = {
    "llama-gqa": ("llama", "LlamaConfig", {}),
    "llama-mha": ("llama", "LlamaConfig", dict(num_key_value_heads=4)),
    "mistral-sliding": ("mistral", "MistralConfig", dict(sliding_window=8)),
    "qwen2": ("qwen2", "Qwen2Config", {}),
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=16)),
    "phi3": ("phi3", "Phi3Config", {}),
    "phi": ("phi", "PhiConfig", {}),
    "gemma2-sliding": ("gemma2", "Gemma2Config", dict(head_dim=16, sliding_window=8)),
    "gemma3-sliding": ("gemma3_text", "Gemma3TextConfig", dict(head_dim=16, sliding_window=8)),
    "olmo2": ("olmo2", "Olmo2Config", {}),
    "granite": ("granite", "GraniteConfig", {}),
    "stablelm": ("stablelm", "StableLmConfig", {}),
    "gpt-neox": ("gpt_neox", "GPTNeoXConfig", dict(num_key_value_heads=None)),
    "gpt2": ("gpt2", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=2048)),
}


def build_family_model(folder, model_type, config_class, overrides):
    import torch
    import transformers

    if model_type == "gpt2":
        config = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        config = dict(COMMON)
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**config)).eval()
    assert model.config.model_type == model_type
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(SHIPPED_MODEL / name, folder / name)
    return folder


def test_every_registered_family_has_a_parity_test():
    decoders = {name for name, spec in ARCHS.items() if spec.task == "causal-lm"}
    assert {v[0] for v in VARIANTS.values()} == decoders  # the encoder (bert) is tested in test_minilm.py


VERIFY = """
  greedy_tokens: 24
  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}
"""


# FP16 and INT8 are graph rewrites of the exported MatMuls, norms and softmax; they are checked on the families
# whose graphs differ there (GQA with RMSNorm, partial rotary with LayerNorm and a parallel block, Gemma's
# offset norms with soft-capping and sliding windows, GPT-2's fused QKV Conv1D), not on all fourteen.
PRECISION_VARIANTS = ("llama-gqa", "phi", "gemma2-sliding", "gpt2")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_family_parity_through_the_engine(variant, tmp_path):
    model_type, config_class, overrides = VARIANTS[variant]
    folder = build_family_model(tmp_path / variant, model_type, config_class, overrides)
    recipe = write_recipe(tmp_path / "r.yaml", folder, verify=VERIFY)
    cache = tmp_path / "cache"
    result = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    for name in ("export", "simplify", "engine"):
        m = result.stage(name).verify["metrics"]
        assert result.stage(name).verify["passed"], (name, result.stage(name).verify["failures"])
        assert m["greedy_tokens_matched"] == m["greedy_tokens_total"] == 24
        assert m["prefill_max_abs_diff"] <= 1e-4 and m["decode_max_abs_diff"] <= 1e-4

    if variant not in PRECISION_VARIANTS:
        return
    # precision on the same export (a cache hit up to simplify). Random weights give near-flat
    # next-token distributions, so top-1 is meaningless here: KL against PyTorch is the check.
    for mode, max_kl in (("fp16", 1e-4), ("int8-dynamic", 5e-3)):
        light = ("    smoothing: {samples: 2, seq_len: 64}\n    fp32_fallback: {samples: 2, seq_len: 64}\n"
                 if mode.startswith("int8") else "")  # the INT8 defaults' work, on fewer calibration tokens
        stages = (f"\n  - type: export\n  - type: simplify\n  - type: precision\n    mode: {mode}\n{light}"
                  f"    verify: {{max_kl_mean: {max_kl}, min_top1_agreement: 0.0, prefill_atol: null, "
                  "decode_atol: null}\n  - type: engine\n")
        recipe = write_recipe(tmp_path / f"{mode}.yaml", folder, stages=stages, verify=VERIFY)
        low = Pipeline.from_recipe(recipe, cache_dir=cache).run()
        assert [s.cached for s in low.stages[:3]] == [True, True, True]
        for name in ("precision", "engine"):
            m = low.stage(name).verify["metrics"]
            assert low.stage(name).verify["passed"] and m["kl_mean"] <= max_kl, (mode, name, m["kl_mean"])
