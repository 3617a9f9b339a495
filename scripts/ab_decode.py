"""Two engines timed against each other on the same decode, interleaved.

The benchmark's two repetitions leave the tiny model's figures about 30% noisy; this runs the
benchmark's own decode loops (this project's IOBinding loop for an engine stage's folder, or
onnxruntime-genai's generator for a folder its model builder wrote, whose thread count is in its
genai_config.json) alternately on two folders, 128-token prompt and 64 greedy tokens, many times, and
compares the medians of the per-step medians. Run it on a quiet machine.

    python scripts/ab_decode.py ENGINE_DIR_A ENGINE_DIR_B [--threads 1] [--reps 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bench.worker import GenaiEngine, OrtEngine


def open_engine(folder: Path, threads: int):
    if (folder / "genai_config.json").is_file():
        return GenaiEngine({"path": str(folder)})
    return OrtEngine({"path": str(folder), "threads": threads})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="an engine stage's cache entry, or an onnxruntime-genai folder")
    parser.add_argument("b", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    engines = [open_engine(p, args.threads) for p in (args.a, args.b)]
    prompt = np.random.default_rng(0).integers(3, 500, (1, args.prompt))
    steps: list[list[float]] = [[], []]
    for _ in range(args.reps):
        for k, engine in enumerate(engines):
            steps[k].append(float(np.median(engine.decode(prompt, args.new)["steps_s"])))
    a, b = float(np.median(steps[0])), float(np.median(steps[1]))
    print(f"{args.threads} thread(s), {args.reps} interleaved runs: step p50 A {a * 1e3:.3f} ms, "
          f"B {b * 1e3:.3f} ms; A is {b / a:.2f}x B")


if __name__ == "__main__":
    main()
