"""ONNX Runtime execution of an exported causal LM with its KV cache.

The past is kept as ONNX Runtime values between steps (IOBinding), so a decode step does
not copy the cache through numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import CausalLMRunner

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class SessionSettings:
    """Everything needed to open a session the same way again; saved next to an engine."""

    execution_provider: str = "CPUExecutionProvider"
    graph_optimization_level: str = "all"
    intra_op_threads: int = 1
    allow_spinning: bool = False
    # accuracy level of the MatMulNBits that ONNX Runtime fuses from INT4 DequantizeLinear + MatMul
    # (its own default is 4, int8 compute); None leaves ONNX Runtime's default
    dq_matmulnbits_accuracy_level: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def session_options(self, optimized_model_path: Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[self.graph_optimization_level])
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if self.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3
        if self.dq_matmulnbits_accuracy_level is not None:
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                          str(self.dq_matmulnbits_accuracy_level))
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        return opts

    def open(self, model_path: Path, optimized_model_path: Path | None = None):
        import onnxruntime as ort

        return ort.InferenceSession(
            str(model_path),
            sess_options=self.session_options(optimized_model_path),
            providers=[self.execution_provider],
        )


class OrtLM(CausalLMRunner):
    name = "onnxruntime"

    def __init__(self, model_path: Path, io: dict[str, Any], settings: SessionSettings):
        import onnxruntime as ort

        self.ort = ort
        self.io = io
        self.session = settings.open(model_path)
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.past_names = io["past_inputs"]
        self.present_names = io["present_outputs"]
        self.output_names = [io["logits_output"], *self.present_names]
        self.past_dtype = NP_TYPES[types[self.past_names[0]]] if self.past_names else np.float32
        self.binding = self.session.io_binding()

    def empty_past(self, batch: int) -> list[Any]:
        shape = (batch, self.io["kv_heads"], 0, self.io["head_dim"])
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past):
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                b.bind_cpu_input(name, value)
            else:
                b.bind_ortvalue_input(name, value)
        for name in self.output_names:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy()
        return logits.astype(np.float32, copy=False), list(outs[1:])

    def close(self) -> None:
        self.binding = None
        self.session = None
