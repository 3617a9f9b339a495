"""Benchmark worker: one process per engine, so each engine's peak memory is its own.

Run as `python -m pipeline.bench.worker SPEC_JSON`; it speaks JSON lines on stdin/stdout
(anything an engine prints goes to stderr). The coordinator interleaves engines between
repetitions. Only numpy is imported at the top: the worker also runs with the Python of a
peer's own virtual environment, where the pipeline's dependencies may be missing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class TorchEngine:
    """PyTorch eager through Hugging Face `generate` (greedy, KV cache), as a user runs it.
    FP32 on the CPU; FP16 on a CUDA GPU when one is present (spec["device"] == "cuda")."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.device = spec.get("device", "cpu")
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval().to(self.device)

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def decode(self, prompt: np.ndarray, new: int) -> dict[str, Any]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []
        torch = self.torch
        sync = self._sync

        class Stamp(StoppingCriteria):
            """Called once per generated token: a timestamp, and never a stop."""

            def __call__(self, input_ids, scores, **kwargs):
                sync()
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = self.torch.from_numpy(prompt).to(self.device)
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, num_beams=1,
                                      stopping_criteria=StoppingCriteriaList([Stamp()]), pad_token_id=0)
        tokens = out[:, prompt.shape[1]:].cpu().numpy()
        return {"tokens": tokens.tolist(), "ttft_s": stamps[0] - t0, "steps_s": list(np.diff(stamps))}

    def prefill(self, prompt: np.ndarray) -> float:
        ids = self.torch.from_numpy(prompt).to(self.device)
        self._sync()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            self.model(input_ids=ids, attention_mask=self.torch.ones_like(ids), use_cache=True)
        self._sync()
        return time.perf_counter() - t0

    def gpu_memory(self) -> int:
        return int(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else 0


class OptimumEngine(TorchEngine):
    """Hugging Face Optimum's ORTModelForCausalLM (an ONNX Runtime session behind `generate`). Runs in
    its own virtual environment: optimum-onnx needs transformers < 4.58."""

    def __init__(self, spec: dict[str, Any]):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        self.device = "cpu"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = spec["threads"]
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model = ORTModelForCausalLM.from_pretrained(spec["path"], session_options=opts,
                                                         provider="CPUExecutionProvider")


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


ENGINES = {"torch": TorchEngine, "ort": OrtEngine, "genai": GenaiEngine, "optimum": OptimumEngine}


def peak_rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def serve(conn, spec: dict[str, Any]) -> None:
    """Worker loop: load the engine, then answer workload requests until told to stop."""
    try:
        engine: Any = ENGINES[spec["kind"]](spec)
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
            out["gpu_bytes"] = engine.gpu_memory() if hasattr(engine, "gpu_memory") else 0
            conn.send({"ok": True, **out})
        except Exception as exc:
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


class JsonLines:
    """A connection over two text streams, one JSON object per line."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, obj: dict[str, Any]) -> None:
        self.writer.write(json.dumps(obj, default=_plain) + "\n")
        self.writer.flush()

    def recv(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise EOFError("the other side closed the connection")
        return json.loads(line)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def main() -> None:
    import sys

    spec = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # engine chatter on stdout must not corrupt the protocol
    serve(JsonLines(sys.stdin, protocol), spec)


if __name__ == "__main__":
    main()
