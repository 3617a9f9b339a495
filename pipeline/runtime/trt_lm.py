"""TensorRT execution of an exported causal LM through Polygraphy's TrtRunner (GPU only).

The past goes through host numpy arrays on every step (TrtRunner copies outputs to the
host), which is simple and slower than device-resident buffers; latency figures say so.
Before each call the runner switches to the first optimization profile that holds the
call's shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..tensorrt.profiles import DerivedProfile, profile_for
from .base import CausalLMRunner


class TrtLM(CausalLMRunner):
    name = "tensorrt"

    def __init__(self, plan_path: Path, io: dict[str, Any], profiles: list[DerivedProfile],
                 past_dtype: Any = np.float32):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.io = io
        self.profiles = profiles
        self.past_dtype = past_dtype
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))))
        self.runner.activate()
        self.profile: int | None = None

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.io["kv_heads"], 0, self.io["head_dim"])
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.io["past_inputs"]]

    def feed(self, input_ids, attention_mask, position_ids, past) -> dict[str, np.ndarray]:
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feed.update({name: np.ascontiguousarray(v) for name, v in zip(self.io["past_inputs"], past)})
        return feed

    def forward(self, input_ids, attention_mask, position_ids, past):
        feed = self.feed(input_ids, attention_mask, position_ids, past)
        index = profile_for(self.profiles, {k: v.shape for k, v in feed.items()})
        if index is None:
            raise ValueError(f"no optimization profile holds these shapes: "
                             f"{ {k: v.shape for k, v in feed.items() if k in ('input_ids', 'attention_mask')} }")
        if index != self.profile:
            self.runner.set_profile(index)
            self.profile = index
        out = self.runner.infer(feed)
        logits = np.asarray(out[self.io["logits_output"]], dtype=np.float32)
        return logits, [np.asarray(out[name]) for name in self.io["present_outputs"]]

    def close(self) -> None:
        if self.runner is not None and self.runner.is_active:
            self.runner.deactivate()
        self.runner = None
