"""A causal LM served by a running Triton server, driven over gRPC with its KV cache passed each step.

The client side of a packaged Triton model repository: the same greedy loop as every other runner
(runtime/base.py), so a package's tokens are compared with PyTorch's exactly as an engine's are. Needs
tritonclient[grpc]; the server can run anywhere the URL reaches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import CausalLMRunner

NP_OF_TRITON = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


class TritonLM(CausalLMRunner):
    name = "triton"

    def __init__(self, url: str, model: str, io: dict[str, Any], timeout_s: float = 120.0):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.io = io
        self.timeout_s = timeout_s
        metadata = self.client.get_model_metadata(model, as_json=True)
        self.datatypes = {t["name"]: t["datatype"] for t in metadata["inputs"]}
        self.past_names = io["past_inputs"]
        self.present_names = io["present_outputs"]
        self.output_names = [io["logits_output"], *self.present_names]
        missing = [n for n in ["input_ids", "attention_mask", "position_ids", *self.past_names]
                   if n not in self.datatypes]
        if missing:
            raise ValueError(f"Triton model {model!r} at {url} has no input(s) {missing}: not this engine's graph")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.io["kv_heads"], 0, self.io["head_dim"])
        dtype = NP_OF_TRITON[self.datatypes[self.past_names[0]]] if self.past_names else np.float32
        return [np.zeros(shape, dtype=dtype) for _ in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past):
        named = [("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids),
                 *zip(self.past_names, past)]
        inputs = []
        for name, value in named:
            array = np.ascontiguousarray(value, dtype=NP_OF_TRITON[self.datatypes[name]])
            tensor = self.grpc.InferInput(name, list(array.shape), self.datatypes[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self.grpc.InferRequestedOutput(n) for n in self.output_names]
        result = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        logits = result.as_numpy(self.io["logits_output"]).astype(np.float32, copy=False)
        return logits, [result.as_numpy(n) for n in self.present_names]

    def close(self) -> None:
        self.client.close()
