"""Triton model configuration (config.pbtxt) from an ONNX graph's declared inputs and outputs.

The text is written directly in protobuf text format, so writing a package needs no Triton
package; tests parse it with Triton's own ModelConfig schema (tritonclient) to prove it valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import RecipeError
from .tensorrt.profiles import GraphInput

# ONNX element type name -> Triton DataType name
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16", "INT8": "TYPE_INT8",
    "UINT64": "TYPE_UINT64", "UINT32": "TYPE_UINT32", "UINT16": "TYPE_UINT16", "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}

BACKENDS = {
    # engine backend -> (platform, Triton backend, model file, instance kind)
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx", "KIND_CPU"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan", "KIND_GPU"),
}

PYTHON_MODEL = "model.py"  # the Python backend's entry point (pipeline/triton_python_model.py)

ORT_GRAPH_LEVEL_DISABLED = 2  # the onnxruntime backend's optimization.graph.level for ORT_DISABLE_ALL


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class TritonModel:
    name: str
    backend: str  # engine backend: onnxruntime | tensorrt
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    instance_count: int = 1
    profiles: tuple[str, ...] = ()  # TensorRT optimization profile indices for the instance group
    dynamic_batching: dict | None = None  # {"max_queue_delay_microseconds": int, "preferred_batch_size": [...]}
    parameters: dict[str, str] = field(default_factory=dict)
    graph_level: int | None = None  # onnxruntime backend: optimization.graph.level
    # "native": Triton's backend for the engine (onnxruntime, tensorrt); "python": Triton's Python backend
    # running the ONNX Runtime engine through model.py, for servers built without the onnxruntime backend
    server_backend: str = "native"

    @property
    def model_file(self) -> str:
        return BACKENDS[self.backend][2]


def triton_tensors(values: list[GraphInput], max_batch_size: int,
                   batch_axis: str = "batch") -> tuple[TritonTensor, ...]:
    """Names, types and dims as Triton wants them: -1 for a dynamic dim; with max_batch_size > 0
    the leading batch axis is Triton's and is left out."""
    out = []
    for v in values:
        if v.dtype not in TRITON_TYPES:
            raise RecipeError(f"graph tensor {v.name} has type {v.dtype}, which Triton has no type for")
        dims = list(v.dims)
        if max_batch_size > 0:
            if not dims or dims[0] != batch_axis:
                raise RecipeError(f"package.max_batch_size > 0 needs the '{batch_axis}' axis first on every input "
                                  f"and output; {v.name} has dims {dims}: set max_batch_size: 0")
            dims = dims[1:]
        out.append(TritonTensor(v.name, TRITON_TYPES[v.dtype], tuple(d if isinstance(d, int) else -1 for d in dims)))
    return tuple(out)


def _tensor_block(kind: str, tensors: tuple[TritonTensor, ...]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        lines += ["  {", f"    name: {json.dumps(t.name)}", f"    data_type: {t.data_type}", f"    dims: [ {dims} ]",
                  "  }" + ("," if i < len(tensors) - 1 else "")]
    return lines + ["]"]


def render_config(model: TritonModel) -> str:
    """config.pbtxt text for the model."""
    platform, backend, _, kind = BACKENDS[model.backend]
    python = model.server_backend == "python"
    lines = [f"name: {json.dumps(model.name)}"]
    lines += ['backend: "python"'] if python else [f"platform: {json.dumps(platform)}",
                                                    f"backend: {json.dumps(backend)}"]
    lines.append(f"max_batch_size: {model.max_batch_size}")
    lines += _tensor_block("input", model.inputs)
    lines += _tensor_block("output", model.outputs)
    group = ["instance_group [", "  {", f"    count: {model.instance_count}", f"    kind: {kind}"]
    if model.profiles:
        group.append(f"    profile: [ {', '.join(json.dumps(p) for p in model.profiles)} ]")
    lines += group + ["  }", "]"]
    if model.dynamic_batching is not None:
        lines.append("dynamic_batching {")
        preferred = model.dynamic_batching.get("preferred_batch_size") or []
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
        lines.append(f"  max_queue_delay_microseconds: {model.dynamic_batching['max_queue_delay_microseconds']}")
        lines.append("}")
    parameters = dict(model.parameters)
    if python:  # model.py opens the engine's file unoptimized; the onnxruntime backend's own keys are not its
        parameters = {"model_file": model.model_file,
                      "intra_op_thread_count": parameters.get("intra_op_thread_count", "1")}
    elif model.graph_level is not None:
        lines += ["optimization {", "  graph {", f"    level: {model.graph_level}", "  }", "}"]
    for key, value in sorted(parameters.items()):
        lines.append(f"parameters {{ key: {json.dumps(key)} value {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse config.pbtxt with Triton's ModelConfig schema (needs tritonclient[grpc]); unknown
    fields or wrong types raise google.protobuf.text_format.ParseError."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
