"""Benchmark worker: one process per engine, so each engine's peak memory is its own.

The coordinator sends workloads over a pipe and interleaves engines between repetitions.
This module imports only numpy at the top: it also runs in the peers' own virtual
environments, where the pipeline's dependencies may be missing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class TorchEngine:
    """PyTorch eager through Hugging Face `generate` (greedy, KV cache), as a user runs it."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()

    def decode(self, prompt: np.ndarray, new: int) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []
        torch = self.torch

        class Stamp(StoppingCriteria):
            """Called once per generated token: a timestamp, and never a stop."""

            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        ids = self.torch.from_numpy(prompt)
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, num_beams=1,
                                      stopping_criteria=StoppingCriteriaList([Stamp()]), pad_token_id=0)
        tokens = out[:, prompt.shape[1]:].numpy()
        return {"tokens": tokens.tolist(), "ttft_s": stamps[0] - t0, "steps_s": list(np.diff(stamps))}

    def prefill(self, prompt: np.ndarray) -> float:
        ids = self.torch.from_numpy(prompt)
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            self.model(input_ids=ids, attention_mask=self.torch.ones_like(ids), use_cache=True)
        return time.perf_counter() - t0


class OrtEngine:
    """An enginewright ONNX Runtime engine: the saved model and session settings, IOBinding loop."""

    def __init__(self, spec: dict[str, Any]):
        from pathlib import Path

        from pipeline.runtime.ort_lm import OrtLM, SessionSettings

        folder = Path(spec["path"])
        session = json.loads((folder / "session.json").read_text())["load"]
        session["intra_op_threads"] = spec["threads"]
        self.runner = OrtLM(folder / "model.onnx", json.loads((folder / "io.json").read_text()),
                            SessionSettings(**session))

    def decode(self, prompt: np.ndarray, new: int) -> dict[str, Any]:
        from pipeline.runtime.base import position_ids_from_mask

        r = self.runner
        batch, length = prompt.shape
        mask = np.ones_like(prompt)
        t0 = time.perf_counter()
        logits, past = r.forward(prompt, mask, position_ids_from_mask(mask), r.empty_past(batch))
        token = np.argmax(logits[:, -1], -1).astype(np.int64)[:, None]
        ttft = time.perf_counter() - t0
        tokens, steps = [token], []
        for i in range(new - 1):
            t = time.perf_counter()
            mask = np.ones((batch, length + i + 1), dtype=np.int64)
            logits, past = r.forward(token, mask, np.full((batch, 1), length + i, dtype=np.int64), past)
            token = np.argmax(logits[:, -1], -1).astype(np.int64)[:, None]
            steps.append(time.perf_counter() - t)
            tokens.append(token)
        return {"tokens": np.concatenate(tokens, 1).tolist(), "ttft_s": ttft, "steps_s": steps}

    def prefill(self, prompt: np.ndarray) -> float:
        from pipeline.runtime.base import position_ids_from_mask

        mask = np.ones_like(prompt)
        t0 = time.perf_counter()
        self.runner.forward(prompt, mask, position_ids_from_mask(mask), self.runner.empty_past(prompt.shape[0]))
        return time.perf_counter() - t0


class GenaiEngine:
    """onnxruntime-genai: a folder written by its model builder, run with its own generator."""

    def __init__(self, spec: dict[str, Any]):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(spec["path"])

    def decode(self, prompt: np.ndarray, new: int) -> dict[str, Any]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False, batch_size=prompt.shape[0])
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        gen.generate_next_token()
        tokens = [np.array(gen.get_next_tokens()).reshape(-1, 1)]
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(new - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            tokens.append(np.array(gen.get_next_tokens()).reshape(-1, 1))
            steps.append(time.perf_counter() - t)
        return {"tokens": np.concatenate(tokens, 1).tolist(), "ttft_s": ttft, "steps_s": steps}

    def prefill(self, prompt: np.ndarray) -> float:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt.shape[1] + 1, do_sample=False, batch_size=prompt.shape[0])
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        return time.perf_counter() - t0


ENGINES = {"torch": TorchEngine, "ort": OrtEngine, "genai": GenaiEngine}


def peak_rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def serve(conn, spec: dict[str, Any]) -> None:
    """Worker loop: load the engine, then answer workload requests until told to stop."""
    try:
        engine = ENGINES[spec["kind"]](spec)
        conn.send({"ok": True, "rss": peak_rss_bytes()})
    except Exception as exc:  # reported to the coordinator, which records the engine as failed
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    while True:
        msg = conn.recv()
        if msg["op"] == "stop":
            return
        if msg["op"] == "stats":
            conn.send({"ok": True, "cpu_s": sum(os.times()[:2]), "rss": peak_rss_bytes()})
            continue
        try:
            prompt = np.asarray(msg["prompt"], dtype=np.int64)
            if msg["op"] == "decode":
                out = engine.decode(prompt, msg["new"])
            else:
                out = {"prefill_s": engine.prefill(prompt)}
            out["rss"] = peak_rss_bytes()
            conn.send({"ok": True, **out})
        except Exception as exc:
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
