"""What every runtime that executes a causal LM offers to verification and benchmarks.

A runner takes numpy inputs (input_ids, attention_mask, position_ids) plus an opaque past
state, and returns float32 logits plus the new state. Greedy generation is written once
here on top of that, with optional per-step timing.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def position_ids_from_mask(mask: np.ndarray, past_len: int = 0) -> np.ndarray:
    """Positions that skip left padding: cumulative count of real tokens, minus one."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.clip(pos, 0, None)
    return pos[:, past_len:].astype(np.int64)


@dataclass
class GenerationTrace:
    tokens: list[int]
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


class CausalLMRunner(ABC):
    name: str = "runner"

    @abstractmethod
    def empty_past(self, batch: int) -> Any: ...

    @abstractmethod
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        """Logits for the last len(input_ids[0]) positions and the grown past."""

    def generate(self, prompt: np.ndarray, new_tokens: int) -> GenerationTrace:
        """Greedy decoding for one unpadded prompt (shape [1, n]) with the KV cache, timed per step."""
        ids = prompt.astype(np.int64)
        mask = np.ones_like(ids)
        past = self.empty_past(1)
        t0 = time.perf_counter()
        logits, past = self.forward(ids, mask, position_ids_from_mask(mask), past)
        trace = GenerationTrace(tokens=[], prefill_s=time.perf_counter() - t0)
        token = int(np.argmax(logits[0, -1]))
        trace.tokens.append(token)
        position = ids.shape[1]
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            mask = np.ones((1, position + 1), dtype=np.int64)
            logits, past = self.forward(
                np.array([[token]], dtype=np.int64), mask, np.array([[position]], dtype=np.int64), past
            )
            token = int(np.argmax(logits[0, -1]))
            trace.step_s.append(time.perf_counter() - t0)
            trace.tokens.append(token)
            position += 1
        return trace

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
