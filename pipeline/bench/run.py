"""`enginewright bench`: every engine side by side, in one sitting, repetitions interleaved.

Engines: PyTorch eager `generate` (FP32, the 1.0x baseline); the engines this project builds
(FP32, dynamic INT8, static INT8 Q/DQ); and the peer a user would pick instead that installs
here, onnxruntime-genai's model builder (FP32 and INT4) with its own generator. Each engine
runs in its own worker process (its peak memory is its own); repetitions go round-robin over
the engines so a noisy neighbour hurts every engine alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..verify.accuracy import matched_prefix
from . import worker
from .machine import contention_sample, memory_bandwidth
from .models import build_large_llama, model_weight_bytes
from .peers import genai_engine, genai_threads, optimum_engine

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "tiny-llama"


@dataclass(frozen=True)
class Workloads:
    prompt: int
    new: int
    prefill: int
    batch: int
    reps: int


FULL = Workloads(prompt=128, new=64, prefill=512, batch=4, reps=2)
QUICK = Workloads(prompt=32, new=16, prefill=128, batch=4, reps=2)

# (stages before export, stages between simplify and the engine). Random weights make top-1 and KL
# meaningless on the large model, so the bench recipes do not gate on them; quality is tested elsewhere.
LOOSE = "    verify: {max_kl_mean: 1.0, min_top1_agreement: 0.0, prefill_atol: null, decode_atol: null}\n"
PIPELINE_VARIANTS = {
    "enginewright-fp32": ("", ""),
    "enginewright-fp32-opset18": ("", ""),  # the same engine before the opset-23 fused ops, for comparison
    "enginewright-fp32-unfused": ("", ""),  # opset 23 without the engine's attention fusion, for comparison
    "enginewright-int8-dynamic": ("", "  - type: precision\n    mode: int8-dynamic\n" + LOOSE),
    "enginewright-int8-qdq": ("", "  - type: precision\n    mode: int8-qdq\n    calibration: {samples: 8, seq_len: 64}\n"
                              + LOOSE),
    "enginewright-rtn-int4": (
        "  - type: quantize\n    method: rtn\n    bits: 4\n    group_size: 128\n    exclude: []\n"
        "    verify: {max_kl_mean: 10.0, min_top1_agreement: 0.0, max_perplexity_increase: 100.0}\n",
        "  - type: precision\n    mode: int4\n    accuracy_level: 4\n" + LOOSE),
}
GENAI_VARIANTS = {"genai-fp32": "fp32", "genai-int4": "int4"}


@dataclass
class Engine:
    name: str
    kind: str  # torch | ort | genai
    model: str
    path: Path
    size_bytes: int
    family: str  # baseline | enginewright | peer
    model_dir: Path  # the Hugging Face folder it came from
    python: Path | None = None  # a peer's own virtual environment
    device: str = "cpu"


@dataclass
class BenchResult:
    data: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix != ".json")


def _pipeline_engine(model_dir: Path, variant: str, out: Path, cache_dir: Path, say: Callable[[str], None]) -> Path:
    from ..pipeline import Pipeline

    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    recipe = recipes / f"{model_dir.name}-{variant}.yaml"
    before, after = PIPELINE_VARIANTS[variant]
    opset = 18 if variant.endswith("-opset18") else 23
    recipe.write_text(
        f"schema_version: 1\nname: bench-{model_dir.name}-{variant}\nmodel:\n  path: {model_dir}\nstages:\n"
        f"{before}  - type: export\n    opset: {opset}\n  - type: simplify\n{after}  - type: engine\n    intra_op_threads: 1\n"
        f"    fuse_attention: {'false' if variant.endswith('-unfused') else 'true'}\n"
        "verify:\n  greedy_tokens: 8\n  min_greedy_match: 0.0\n  eval_windows: 2\n"
        "  latency: {warmup: 0, repeats: 1, prompt_tokens: 16, decode_tokens: 4}\n"
    )
    say(f"building {variant} for {model_dir.name} (cached after the first run)")
    result = Pipeline.from_recipe(recipe, cache_dir=cache_dir, say=lambda m: None).run()
    return Path(result.stage("engine").artifact).parent


def _summary(records: list[dict[str, Any]], batch: int, new: int) -> dict[str, Any]:
    steps = np.array([s for r in records for s in r["steps_s"]]) * 1e3
    totals = [sum(r["steps_s"]) for r in records]
    p50, p90, p99 = np.percentile(steps, [50, 90, 99]) if len(steps) else (np.nan,) * 3
    return {"tokens_per_s": float(batch * (new - 1) / np.median(totals)), "ttft_ms": float(np.median(
        [r["ttft_s"] for r in records]) * 1e3), "step_ms_p50": float(p50), "step_ms_p90": float(p90),
        "step_ms_p99": float(p99)}


class Workers:
    """One worker process per (engine, threads), each a `python -m pipeline.bench.worker` with the
    engine's own interpreter (a peer may bring its own virtual environment)."""

    def __init__(self, log: Path) -> None:
        self.log = open(log, "a")  # noqa: SIM115 (kept open for the workers' lifetime, closed in close())
        self.live: dict[tuple[str, str, int], tuple[subprocess.Popen, worker.JsonLines]] = {}

    def start(self, engine: Engine, threads: int) -> dict[str, Any]:
        spec = {"kind": engine.kind, "path": str(engine.path), "threads": threads, "device": engine.device}
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([str(engine.python or sys.executable), "-m", "pipeline.bench.worker",
                                 json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                text=True, env=env, cwd=ROOT)
        conn = worker.JsonLines(proc.stdout, proc.stdin)
        try:
            reply = conn.recv()
        except EOFError:
            reply = {"ok": False, "error": f"worker exited with code {proc.wait()} (see {self.log.name})"}
        if reply["ok"]:
            self.live[(engine.model, engine.name, threads)] = (proc, conn)
        else:
            proc.kill()
            proc.wait()
        return reply

    def ask(self, key, msg: dict[str, Any]) -> dict[str, Any]:
        proc, conn = self.live[key]
        conn.send(msg)
        try:
            return conn.recv()
        except EOFError:
            return {"ok": False, "error": f"worker died with code {proc.wait()}"}

    def stop(self) -> None:
        for proc, conn in self.live.values():
            try:
                conn.send({"op": "stop"})
                proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        self.live.clear()
        self.log.close()


def run_bench(out_dir: Path, cache_dir: Path, quick: bool = False, say: Callable[[str], None] = print) -> BenchResult:
    wl = QUICK if quick else FULL
    out_dir = Path(out_dir).resolve()  # generated recipes name models under it; they must not be relative
    cache_dir = Path(cache_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_list = [1] if quick else sorted({1, os.cpu_count() or 1})
    models = {"tiny-llama": SHIPPED}
    if not quick:
        models["llama-200m-random"] = build_large_llama(out_dir / "models" / "llama-200m-random", say)

    engines: list[Engine] = []
    notes: list[str] = []
    for model_name, model_dir in models.items():
        engines.append(Engine("pytorch-eager", "torch", model_name, model_dir, folder_bytes(model_dir), "baseline",
                              model_dir))
        for variant in PIPELINE_VARIANTS:
            folder = _pipeline_engine(model_dir, variant, out_dir, cache_dir, say)
            engines.append(Engine(variant, "ort", model_name, folder, folder_bytes(folder), "enginewright", model_dir))
        if _cuda_available():
            engines.append(Engine("pytorch-eager-fp16-cuda", "torch", model_name, model_dir, folder_bytes(model_dir),
                                  "baseline", model_dir, device="cuda"))
        if not quick:
            optimum = optimum_engine(model_dir, out_dir, say)
            if optimum is None:
                notes.append(f"optimum-ort: not available for {model_name} (install or export failed; see the log)")
            else:
                python, folder = optimum
                engines.append(Engine("optimum-ort", "optimum", model_name, folder, folder_bytes(folder), "peer",
                                      model_dir, python=python))
        for name, precision in GENAI_VARIANTS.items():
            genai = genai_engine(model_dir, precision, out_dir, say)
            if genai is None:
                notes.append(f"{name}: onnxruntime-genai is not installed (pip install '.[bench]')")
                continue
            engines.append(Engine(name, "genai", model_name, genai, folder_bytes(genai), "peer", model_dir))
    notes.append("FP16 engines are not timed: ONNX Runtime's CPU provider runs most FP16 ops through casts; "
                 "there is no GPU here.")
    notes.append("enginewright-rtn-int4 is RTN W4 g128, LM head included, lowered to MatMulNBits with int8 compute "
                 "(accuracy level 4), as genai-int4 is the peer's own RTN INT4 with its LM head quantized too. GPTQ and AWQ engines lower to the same kernel "
                 "(same speed, better accuracy: README, Quantization).")
    notes.append("enginewright-fp32-unfused is enginewright-fp32 without the engine's attention fusion, and "
                 "enginewright-fp32-opset18 the same model exported at opset 18, built in the same run.")
    if quick:
        notes.append("Quick mode leaves out Optimum (its virtual environment takes minutes to build) and the "
                     "large model.")
    if not _cuda_available():
        notes.append("No CUDA GPU: the PyTorch FP16 GPU baseline and GPU memory are not measured.")

    say("measuring memory bandwidth")
    bandwidth = memory_bandwidth()
    rng = np.random.default_rng(0)
    prompts = {m: {"b1": rng.integers(3, 2048, (1, wl.prompt)), "bN": rng.integers(3, 2048, (wl.batch, wl.prompt)),
                   "prefill": rng.integers(3, 2048, (1, wl.prefill))} for m in models}

    workers = Workers(out_dir / "workers.log")
    records: dict[tuple, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    try:
        for engine in engines:
            for threads in threads_list:
                say(f"starting {engine.model}/{engine.name} ({threads} thread{'s' if threads > 1 else ''})")
                if engine.kind == "genai":  # genai takes its thread count from its config file
                    engine = replace(engine, path=genai_threads(engine.path, threads))
                reply = workers.start(engine, threads)
                if not reply["ok"]:
                    failures[f"{engine.model}/{engine.name}/{threads}"] = reply["error"]

        cpu_start = {key: workers.ask(key, {"op": "stats"})["cpu_s"] for key in workers.live}
        self_start = sum(os.times()[:2])
        contention_start = contention_sample()
        t_start = time.time()
        for rep in range(wl.reps):
            say(f"repetition {rep + 1}/{wl.reps}")
            for key in list(workers.live):
                model = key[0]
                rec = records.setdefault(key, {"b1": [], "bN": [], "prefill": [], "rss": 0})
                for label, msg in (("b1", {"op": "decode", "prompt": prompts[model]["b1"].tolist(), "new": wl.new}),
                                   ("bN", {"op": "decode", "prompt": prompts[model]["bN"].tolist(), "new": wl.new}),
                                   ("prefill", {"op": "prefill", "prompt": prompts[model]["prefill"].tolist()})):
                    reply = workers.ask(key, msg)
                    if not reply["ok"]:
                        failures["/".join(map(str, key))] = reply["error"]
                        continue
                    rec[label].append(reply)
                    rec["rss"] = max(rec["rss"], reply["rss"])
        elapsed = time.time() - t_start
        contention_end = contention_sample()
        ours_cpu = sum(os.times()[:2]) - self_start + sum(
            workers.ask(key, {"op": "stats"})["cpu_s"] - cpu_start[key] for key in workers.live)
    finally:
        workers.stop()

    busy = contention_end["busy_s"] - contention_start["busy_s"]
    ncpu = os.cpu_count() or 1
    other_share = max(0.0, (busy - ours_cpu) / (elapsed * ncpu))

    rows = []
    for (model, name, threads), rec in records.items():
        if not rec["b1"]:
            continue
        engine = next(e for e in engines if e.model == model and e.name == name)
        ref = records.get((model, "pytorch-eager", threads))
        row = {"model": model, "engine": name, "family": engine.family, "threads": threads,
               "size_mb": engine.size_bytes / 1e6, "peak_rss_mb": rec["rss"] / 1e6,
               "peak_gpu_mb": max(r.get("gpu_bytes", 0) for r in rec["b1"] + rec["bN"]) / 1e6,
               "decode_b1": _summary(rec["b1"], 1, wl.new), f"decode_b{wl.batch}": _summary(rec["bN"], wl.batch, wl.new),
               "prefill_ms": float(np.median([r["prefill_s"] for r in rec["prefill"]]) * 1e3)}
        if ref and ref["b1"]:
            row["greedy_agreement"] = float(np.mean([matched_prefix(r["tokens"][0], q["tokens"][0]) / wl.new
                                                     for r, q in zip(rec["b1"], ref["b1"])]))
            base = _summary(ref["b1"], 1, wl.new)["tokens_per_s"]
            row["speedup_vs_pytorch"] = row["decode_b1"]["tokens_per_s"] / base
        weight_bytes = model_weight_bytes(engine)
        row["weight_mb"] = weight_bytes / 1e6
        row["roofline_ratio"] = weight_bytes * row["decode_b1"]["tokens_per_s"] / bandwidth["bytes_per_s"]
        rows.append(row)

    data = {
        "schema_version": 1,
        "quick": quick,
        "workloads": wl.__dict__,
        "machine": {"cpu": _cpu(), "cores": ncpu, "memory_bandwidth_gb_s": bandwidth["bytes_per_s"] / 1e9,
                    "bandwidth_method": bandwidth["method"], "other_processes_cpu_share": other_share},
        "seconds_measuring": elapsed,
        "rows": rows,
        "targets": targets(rows, wl.batch),
        "failures": failures,
        "notes": notes,
    }
    from .report import write_outputs

    files = write_outputs(data, out_dir)
    return BenchResult(data, out_dir, files)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cpu() -> dict[str, Any]:
    from ..target import cpu_fingerprint

    return cpu_fingerprint()


def targets(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The issue's targets, as ratios from this run (reported, never asserted)."""

    def tps(model, engine, threads=1):
        r = next((r for r in rows if r["model"] == model and r["engine"] == engine and r["threads"] == threads), None)
        return r["decode_b1"]["tokens_per_s"] if r else None

    out = []

    def ratio(label, a, b, goal):
        value = a / b if a and b else None
        out.append({"target": label, "ratio": value, "goal": goal,
                    "met": None if value is None else value >= goal})

    ratio("FP32 engine / genai FP32 (tiny, 1 thread)", tps("tiny-llama", "enginewright-fp32"),
          tps("tiny-llama", "genai-fp32"), 1.0)
    ratio("INT4 engine (RTN, MatMulNBits) / genai INT4 (tiny, 1 thread)", tps("tiny-llama", "enginewright-rtn-int4"),
          tps("tiny-llama", "genai-int4"), 1.1)
    for v in ("enginewright-int8-dynamic", "enginewright-int8-qdq"):
        ratio(f"{v} / PyTorch eager (tiny, 1 thread)", tps("tiny-llama", v), tps("tiny-llama", "pytorch-eager"), 5.0)
    large = [r for r in rows if r["model"] == "llama-200m-random" and r["family"] == "enginewright"]
    best = max(large, key=lambda r: r["roofline_ratio"], default=None)
    out.append({"target": "best engine roofline ratio (large model)", "ratio": best["roofline_ratio"] if best else None,
                "goal": 0.7, "met": None if best is None else best["roofline_ratio"] >= 0.7,
                "engine": f"{best['engine']} ({best['threads']} threads)" if best else None})
    return out
