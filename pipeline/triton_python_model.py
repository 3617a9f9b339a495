"""The `model.py` a Triton model repository carries when it is served by Triton's Python backend
(`package.server_backend: python`): it runs the verified ONNX Runtime engine file beside it.

This file is copied as it is into the repository's version folder and runs inside Triton, not in this
package: it imports only numpy, onnxruntime and the backend's own `triton_python_backend_utils`. It is the
route for Triton servers built without the onnxruntime backend (the server inside nvidia-pytriton, custom
CPU builds). Its settings come from config.pbtxt's parameters, which the package stage writes from the
engine's session settings: the engine's graph is already optimized, so the session opens it unoptimized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TritonPythonModel:
    """Triton's Python-backend interface: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "1"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / parameters["model_file"]), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        """One ONNX Runtime run per request: the dynamic batcher hands several at once, and requests with
        KV caches of different lengths cannot be stacked into one batch."""
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                values = self.session.run(self.outputs, feed)
                tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, values)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # the client gets the error; the instance keeps serving
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def finalize(self) -> None:
        self.session = None
