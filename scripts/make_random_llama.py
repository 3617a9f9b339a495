"""Write a random-weight LLaMA of a real size, in bf16 safetensors shards, with bounded memory.

Presets:
  wide-2gb  4 layers at Llama-2-7B's width (hidden 4096, intermediate 11008, GQA 32/8) and the shipped
            tokenizer's 2,048-token vocabulary: 0.71 B parameters, 1.4 GB in bf16, 2.8 GB in float32, so
            its FP32 ONNX graph is past the 2 GB protobuf limit while exporting in a few minutes
  0.85b     hidden 2048, 16 layers, intermediate 5632, GQA 32/8, vocabulary 32,000: 0.85 B parameters,
            1.7 GB in bf16, 3.4 GB in float32 (the size the real-sizes work was first measured at)
  7b        Llama-2-7B's configuration (32 layers, hidden 4096, intermediate 11008, 32 heads, vocabulary
            32,000): 6.74 B parameters, 13.5 GB in bf16; tokenizer files from the shipped model (its
            2,048 ids are a subset of the vocabulary)

The model is never built in memory: parameter names and shapes come from a meta-device model, and each
tensor is drawn (normal, std 0.02; norms 1), written into a shard of at most --shard-gb, and freed.
Random weights prove plumbing and memory, not quality.

    python scripts/make_random_llama.py --preset wide-2gb --out /tmp/wide-llama
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

PRESETS = {
    "wide-2gb": dict(vocab_size=2048, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    "0.85b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


def write(preset: str, out: Path, seed: int = 0, shard_gb: float = 2.0) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shipped = json.loads((SHIPPED / "config.json").read_text())
    config = LlamaConfig(**PRESETS[preset], rms_norm_eps=1e-5, tie_word_embeddings=False,
                         pad_token_id=shipped.get("pad_token_id", 0), bos_token_id=shipped.get("bos_token_id", 1),
                         eos_token_id=shipped.get("eos_token_id", 2), torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    limit = int(shard_gb * 1e9)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if sizes[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (SHIPPED / name).is_file():
            shutil.copy(SHIPPED / name, out / name)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"preset": preset, "parameters": params, "bf16_bytes": total, "shards": len(shards), "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps(write(args.preset, args.out, args.seed, args.shard_gb)))


if __name__ == "__main__":
    main()
