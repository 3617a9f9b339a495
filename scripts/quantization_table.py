"""Measure every quantize method on the shipped model and print the README's table.

Each row is a shipped recipe run up to its quantize stage (variants change only the quantize
stage's fields), all evaluated on the same held-out windows. Run on a quiet machine: the
seconds column is wall time of the quantization call alone.

    python scripts/quantization_table.py [--cache artifacts] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import Pipeline  # noqa: E402

DROP = "drop"  # a change that removes the field

ROWS = [  # label, recipe, quantize-stage fields to change
    ("RTN", "tiny-llama-rtn-w4.yaml", {}),
    ("GPTQ (GPT-QModel)", "tiny-llama-gptq-w4.yaml", {}),
    ("AWQ (GPT-QModel)", "tiny-llama-awq-w4.yaml", {}),
    ("RTN", "tiny-llama-rtn-w4.yaml", {"group_size": 64}),
    ("GPTQ (GPT-QModel)", "tiny-llama-gptq-w4.yaml", {"group_size": 64}),
    ("bitsandbytes NF4", "tiny-llama-bnb-nf4.yaml", {}),
    ("RTN", "tiny-llama-rtn-w4.yaml", {"bits": 8, "group_size": -1, "symmetric": True}),
    ("GPTQ (GPT-QModel)", "tiny-llama-gptq-w4.yaml", {"bits": 8, "group_size": -1, "symmetric": True}),
    ("bitsandbytes LLM.int8()", "tiny-llama-bnb-nf4.yaml", {"bnb_type": "int8", "double_quant": DROP}),
    ("W8A8, no smoothing", "tiny-llama-smoothquant-w8a8.yaml", {"alpha": None}),
    ("SmoothQuant W8A8", "tiny-llama-smoothquant-w8a8.yaml", {}),
]


def variant(recipe: Path, changes: dict, folder: Path) -> Path:
    data = yaml.safe_load(recipe.read_text())
    data["model"]["path"] = str((recipe.parent / data["model"]["path"]).resolve())
    data["stages"] = [s for s in data["stages"] if s["type"] == "quantize"]
    for key, value in changes.items():
        if value == DROP:
            data["stages"][0].pop(key, None)
        else:
            data["stages"][0][key] = value
    data["name"] = f"{data['name']}-{len(list(folder.iterdir()))}"
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / "artifacts"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, changes in ROWS:
            recipe = variant(ROOT / "recipes" / name, changes, Path(tmp))
            result = Pipeline.from_recipe(recipe, cache_dir=args.cache).run(until="quantize")
            stage = result.stage("quantize")
            info = json.loads((Path(stage.artifact).parent / "quantization.json").read_text())
            m = stage.verify["metrics"]
            group = "channel" if info["group_size"] == -1 else info["group_size"]
            if info.get("bnb_type") in ("nf4", "fp4"):
                group = "64 (block)"  # bitsandbytes' own 4-bit block size
            rows.append({"method": label, "bits": info["bits"], "group": group,
                         "symmetric": info["symmetric"], "kl_mean": m["kl_mean"], "top1": m["top1_agreement"],
                         "perplexity": m["perplexity"], "perplexity_ref": m["perplexity_ref"],
                         "seconds": m["quantize_seconds"], "peak_rss_mb": m["peak_rss_mb"],
                         "recipe": name, "changes": changes})
    print(f"| method | bits | group | kl_mean | top-1 | perplexity (FP32 {rows[0]['perplexity_ref']:.3f}) | seconds "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sym = "" if r["method"].startswith(("bitsandbytes", "W8A8", "Smooth")) else (
            " sym" if r["symmetric"] else " asym")
        print(f"| {r['method']} | {r['bits']}{sym} | {r['group']} | {r['kl_mean']:.4f} | {r['top1']:.3f} | "
              f"{r['perplexity']:.3f} ({r['perplexity'] / r['perplexity_ref'] - 1:+.1%}) | {r['seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
