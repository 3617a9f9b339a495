"""Run recipes on a generated random-weight LLaMA of a real size and tabulate each stage's peak RSS, plan's
estimate, wall time and verdict (`make scale`).

    python scripts/scale_runs.py --preset 0.85b --out artifacts/scale

Three recipes share the model: `default` (export, onnxslim, the ONNX Runtime engine), `int8` (the same with
dynamic INT8, per-token activations and smoothing) and `int4` (RTN W4 g128, then INT4 MatMulNBits). Every
stage runs in a process of its own and is verified as in any run; random weights make quality figures
meaningless (the INT8 and INT4 gates are opened), parity still means something. The goal per stage is the
real-sizes goal: 1.5 x the larger of the checkpoint and the largest artifact (the FP32 graph), plus 2 GB.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VERIFY = """verify:
  greedy_tokens: 8
  eval_windows: 2
  eval_window_tokens: 32
  latency: {warmup: 1, repeats: 1, prompt_tokens: 16, decode_tokens: 4}
"""
OPEN = "    verify: {max_kl_mean: 10.0, min_top1_agreement: 0.0, min_greedy_match: 0.0}\n"
QUANTIZE_OPEN = "    verify: {max_kl_mean: 10.0, min_top1_agreement: 0.0, max_perplexity_increase: null}\n"
STAGES = {
    "default": """  - type: export
    opset: 23
  - type: simplify
    tool: onnxslim
  - type: engine
    backend: onnxruntime
    intra_op_threads: 2
""",
    "int8": """  - type: export
    opset: 23
  - type: simplify
    tool: onnxslim
  - type: precision
    mode: int8-dynamic
    smoothing: {samples: 2, seq_len: 32}
    fp32_fallback: {enabled: false}
""" + OPEN + """  - type: engine
    backend: onnxruntime
    intra_op_threads: 2
""",
    "int4": """  - type: quantize
    method: rtn
    bits: 4
    group_size: 128
""" + QUANTIZE_OPEN + """  - type: export
    opset: 23
  - type: simplify
    tool: onnxslim
  - type: precision
    mode: int4
""" + OPEN + """  - type: engine
    backend: onnxruntime
    intra_op_threads: 2
""",
}


def _maker():
    spec = importlib.util.spec_from_file_location("make_random_llama", ROOT / "scripts" / "make_random_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(preset: str, out: Path, recipes: list[str], cache: Path) -> dict:
    from pipeline import Pipeline

    model = out / f"model-{preset}"
    if not (model / "config.json").is_file():
        print(f"writing the {preset} model to {model}", flush=True)
        made = _maker().write(preset, model)
    else:
        made = json.loads((out / f"model-{preset}.json").read_text())
    (out / f"model-{preset}.json").write_text(json.dumps(made, indent=2) + "\n")
    fp32 = made["parameters"] * 4
    goal = 1.5 * max(fp32, made["bf16_bytes"]) + 2e9
    rows = []
    for name in recipes:
        recipe = out / f"{preset}-{name}.yaml"
        recipe.write_text(f"schema_version: 1\nname: {preset}-{name}\nmodel:\n  path: {model}\nstages:\n"
                          f"{STAGES[name]}{VERIFY}")
        started = time.time()
        result = Pipeline.from_recipe(recipe, cache_dir=cache, isolate=True, say=lambda m: print(m, flush=True)).run()
        for stage in result.stages:
            memory = stage.memory or {}
            rows.append({"recipe": name, "stage": stage.name, "key": stage.key, "cached": stage.cached,
                         "passed": stage.verify.get("passed"), "seconds": stage.build_seconds,
                         "peak_rss_gb": round(memory.get("peak_rss_bytes", 0) / 1e9, 2),
                         "estimate_gb": round((memory.get("estimate_bytes") or 0) / 1e9, 2),
                         "goal_gb": round(goal / 1e9, 2)})
        print(f"{name}: ok={result.ok} in {time.time() - started:.0f} s", flush=True)
    return {"preset": preset, "model": made, "goal_gb": round(goal / 1e9, 2), "rows": rows}


def table(data: dict) -> str:
    lines = [f"Preset {data['preset']}: {data['model']['parameters'] / 1e9:.2f} B parameters, goal "
             f"{data['goal_gb']} GB per stage", "",
             "| recipe | stage | peak RSS GB | plan estimate GB | within goal | seconds | verified |",
             "|---|---|---|---|---|---|---|"]
    shown: set[str] = set()
    for r in data["rows"]:  # a stage shared by several recipes (one cache entry) once, under the first
        if r["key"] in shown:
            continue
        shown.add(r["key"])
        lines.append(f"| {r['recipe']} | {r['stage']} | {r['peak_rss_gb']} | {r['estimate_gb']} | "
                     f"{'yes' if r['peak_rss_gb'] <= r['goal_gb'] else 'NO'} | {r['seconds'] or 0:.0f} | "
                     f"{'passed' if r['passed'] else 'FAILED'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="0.85b")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "scale")
    parser.add_argument("--recipes", default="default,int8,int4")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = run(args.preset, args.out, args.recipes.split(","), args.cache_dir or args.out / "cache")
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "results.md").write_text(table(data))
    print(table(data))


if __name__ == "__main__":
    main()
