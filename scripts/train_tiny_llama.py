"""Train the tiny LLaMA-architecture model that ships in models/tiny-llama.

Deterministic: fixed seeds, a fixed thread count, and text that ships with CPython
(pydoc_data topics, see pipeline/textdata.py). Rerunning it with the same torch and
tokenizers versions regenerates the same weights.

    python scripts/train_tiny_llama.py --out models/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.textdata import load_text

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, steps: int, gen: torch.Generator):
    n = ids.numel() - seq_len - 1
    for _ in range(steps):
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), seq_len):
        window = ids[start : start + seq_len]
        predicted = window.numel() - 1  # labels are shifted inside the model
        if predicted <= 0:
            break
        out = model(window.unsqueeze(0), labels=window.unsqueeze(0))
        nll += out.loss.item() * predicted
        count += predicted
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("models/tiny-llama"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    train = load_text("pydoc:train")
    held_out = load_text("pydoc:eval")

    tokenizer = build_tokenizer(train.content, vocab_size=2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    train_ids = torch.tensor(tokenizer(train.content)["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(held_out.content)["input_ids"], dtype=torch.long)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step, batch in enumerate(batches(train_ids, args.seq_len, args.batch_size, args.steps, gen), 1):
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)

    ppl = perplexity(model, eval_ids, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    card = {
        "parameters": n_params,
        "train_text": {"source": train.name, "sha256": train.sha256, "tokens": int(train_ids.numel())},
        "held_out_text": {"source": held_out.name, "sha256": held_out.sha256, "tokens": int(eval_ids.numel())},
        "held_out_perplexity": round(ppl, 4),
        "perplexity_context": args.seq_len,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "torch": torch.__version__,
        "train_seconds": round(time.time() - t0, 1),
    }
    (args.out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
