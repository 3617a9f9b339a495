"""export: the PyTorch causal LM to ONNX with a KV cache and named dynamic axes.

torch's dynamo exporter cannot take transformers' DynamicCache as an input, so a thin
wrapper takes the past as flat tensors, builds the cache inside, and returns the presents
flat. Axis names are declared here as data, written into the graph, and checked after
export.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from ..artifacts import Artifact
from ..axes import DECODER_AXES
from ..cache import Entry
from ..config import Strict
from ..errors import StageError
from ..logs import quieted
from ..memory import RUNTIME_OVERHEAD_BYTES
from ..onnx_files import MODEL
from ..verify.result import Verification
from .onnx_stage import OnnxStage


class ExportConfig(Strict):
    type: Literal["export"]
    opset: int = Field(default=18, ge=17, le=23)
    external_data_threshold_mb: float = Field(
        default=1024.0, gt=0, description="Weights above this size go to an external data file."
    )
    kv_cache_dtype: Literal["float32", "float16"] | None = Field(
        default=None, description="dtype of the graph's past inputs and present outputs (the KV cache a server "
                                  "holds): float16 by default for a TensorRT engine, float32 otherwise. The "
                                  "model computes attention in its own dtype; the cache is cast at the graph's edge.")

    def threshold_defaults(self) -> tuple[str, dict[str, Any]] | None:
        """An FP16 cache rounds every key and value once: decode logits move by about 1e-3 of their range."""
        if self.kv_cache_dtype == "float16":
            return "kv_cache_dtype float16", {"decode_atol": 5e-2, "min_greedy_match": 0.9}
        return None

# symbolic axis names, by input/output role
AXES = {
    "input_ids": ("batch", "sequence"),
    "attention_mask": ("batch", "total_sequence"),
    "position_ids": ("batch", "sequence"),
    "past": ("batch", None, "past_sequence", None),
    "logits": ("batch", "sequence", None),
    "present": ("batch", None, "total_sequence", None),
}
DYNAMIC_AXES = DECODER_AXES


def io_names(num_layers: int) -> dict[str, list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return {"inputs": ["input_ids", "attention_mask", "position_ids", *past], "past": past,
            "outputs": ["logits", *present], "present": present}


def _axis_role(name: str) -> str:
    if name.startswith("past_key_values."):
        return "past"
    if name.startswith("present."):
        return "present"
    return name


def _make_wrapper(model, num_layers: int, kv_dtype=None):
    import torch
    from transformers import DynamicCache

    compute = next(model.parameters()).dtype

    class KVCacheWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()  # full-length layers: presents always span total_sequence
            for i in range(num_layers):
                cache.update(past[2 * i].to(compute), past[2 * i + 1].to(compute), i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            if kv_dtype is not None and kv_dtype != compute:
                presents = [p.to(kv_dtype) for p in presents]
            return (out.logits, *presents)

    return KVCacheWrapper().eval()


def _make_encoder_wrapper(model, pooling: dict[str, Any], with_token_types: bool):
    import torch

    class EncoderWrapper(torch.nn.Module):
        """Encoder plus the sentence-transformers pooling, so the graph returns the embedding too."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"token_type_ids": token_type_ids} if with_token_types else {}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            if pooling["mode"] == "cls":
                emb = hidden[:, 0]
            else:
                m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if pooling["normalize"]:
                emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return hidden, emb

    return EncoderWrapper().eval()


def set_axis_names(ir_model, io: dict[str, Any]) -> list[str]:
    """Write the declared symbolic names on every graph input/output (onnx_ir model); return problems."""
    import onnx_ir as ir

    problems = []
    values = {v.name: v for v in list(ir_model.graph.inputs) + list(ir_model.graph.outputs)}
    for name, axes in io["axes"].items():
        value = values.get(name)
        if value is None or value.shape is None:
            problems.append(f"graph has no input/output named {name} with a known shape")
            continue
        dims = list(value.shape)
        if len(dims) != len(axes):
            problems.append(f"{name} has rank {len(dims)}, expected {len(axes)}")
            continue
        new = []
        for dim, axis in zip(dims, axes):
            if axis is None:
                new.append(dim)
            elif isinstance(dim, int):
                problems.append(f"{name} axis '{axis}' was exported as the fixed size {dim}")
                new.append(dim)
            else:
                new.append(ir.SymbolicDim(axis))
        value.shape = ir.Shape(new)
    return problems


def _free_parameters(model: Any) -> None:
    """Empty every parameter and buffer of `model` in place, so whatever still refers to them holds nothing."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)


def _drop_weights(program: Any) -> None:
    """Let the exported program's weights go once they are on disk. Its graph's initializers wrap the model's
    own parameter tensors, and something in the exporter keeps the program reachable after the stage returns
    (measured: the parameters stayed alive through verification, so ONNX Runtime's session sat beside a second
    float32 copy of the model)."""
    for value in program.model.graph.initializers.values():
        value.const_value = None
    program.model.graph.initializers.clear()
    program.exported_program = None
    program.release()


class ExportStage(OnnxStage):
    name = "export"
    memory_basis = "fp32"  # the PyTorch model it traces
    memory_overhead = RUNTIME_OVERHEAD_BYTES
    memory_factor = 1.3  # the model loaded in float32 (its weights freed before ONNX Runtime loads the graph)
    disk_factor = 1.0  # the float32 graph
    Config: ClassVar[type] = ExportConfig
    version = 3
    tools = ("torch", "transformers", "onnx", "onnxscript")

    def _reference_then_free(self, model: Any) -> None:
        """With the model still loaded for the export, compute the PyTorch reference outputs and eager baseline
        that verification needs (kept for every later stage), then free its weights before ONNX Runtime loads
        the graph. The exporter keeps some of the parameters reachable after it returns (measured: 29 of the
        wide model's 39), so they are emptied in place rather than only dropped."""
        self.ctx.reference()
        self.ctx.baseline_latency(self.intermediate_settings().intra_op_threads)
        _free_parameters(model)
        self.ctx.release_models()

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        if parent is None:
            raise StageError("export needs the model from the load or quantize stage")
        model_info = Artifact(parent).model_info
        if model_info.get("task", "causal-lm") == "feature-extraction":
            return self._build_encoder(model_info, out)
        return self._build_causal_lm(model_info, out)

    def _export(self, module, args, dynamic_shapes, input_names, output_names, model_info):
        import torch

        self.ctx.say(f"exporting to ONNX (opset {self.spec.opset})")
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), \
                quieted(logging.getLogger("torch.onnx._internal.exporter._registration"), logging.ERROR):
            warnings.simplefilter("ignore")
            try:
                return torch.onnx.export(
                    module, args, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=self.spec.opset,
                    input_names=input_names, output_names=output_names, optimize=True, verbose=False,
                )
            except Exception as exc:  # the exporter raises many types; keep its message
                raise StageError(f"torch.onnx.export failed for {model_info['path']}: {exc}") from exc

    def _save(self, program, io, model_info, out: Path) -> dict[str, Any]:
        problems = set_axis_names(program.model, io)
        if problems:
            raise StageError("exported graph does not have the declared dynamic axes: " + "; ".join(problems))
        external = model_info["weights_bytes"] > self.spec.external_data_threshold_mb * 1024 * 1024
        with contextlib.redirect_stdout(sys.stderr):
            program.save(str(out / MODEL), external_data=external)
        nodes = list(program.model.graph)
        meta = self.finish(out, io, external_data=external, nodes=len(nodes), opset=self.spec.opset,
                           op_types=sorted({n.op_type for n in nodes}))
        _drop_weights(program)
        return meta

    def _build_encoder(self, model_info: dict[str, Any], out: Path) -> dict[str, Any]:
        import torch
        from torch.export import Dim

        from ..verify.embedding import encoder_inputs

        model, _ = self.ctx.reference_model()
        names = encoder_inputs(model)
        wrapper = _make_encoder_wrapper(model, model_info["pooling"], "token_type_ids" in names)
        batch, seq = 2, 7
        args = tuple(torch.ones(batch, seq, dtype=torch.long) if n == "attention_mask"
                     else torch.randint(0, 100, (batch, seq)) if n == "input_ids"
                     else torch.zeros(batch, seq, dtype=torch.long) for n in names)
        b, s = Dim("batch"), Dim("sequence")
        dynamic_shapes = {n: {0: b, 1: s} for n in names}
        outputs = ["last_hidden_state", "sentence_embedding"]
        program = self._export(wrapper, args, dynamic_shapes, names, outputs, model_info)
        io = {
            "task": "feature-extraction",
            "inputs": names,
            "outputs": outputs,
            "pooling": model_info["pooling"],
            "dynamic_axes": ["batch", "sequence"],
            "axes": {**{n: ("batch", "sequence") for n in names},
                     "last_hidden_state": ("batch", "sequence", None), "sentence_embedding": ("batch", None)},
        }
        return self._save(program, io, model_info, out)

    def _build_causal_lm(self, model_info: dict[str, Any], out: Path) -> dict[str, Any]:
        import torch
        from torch.export import Dim

        geo = model_info["geometry"]
        layers, kv_heads, head_dim = geo["num_layers"], geo["kv_heads"], geo["head_dim"]
        names = io_names(layers)
        model, _ = self.ctx.reference_model()
        kv_dtype = {"float16": torch.float16, "float32": torch.float32, None: None}[self.spec.kv_cache_dtype]
        wrapper = _make_wrapper(model, layers, kv_dtype)
        past_dtype = kv_dtype or next(model.parameters()).dtype

        batch, seq, past_len = 2, 3, 5  # sizes above 1 so no axis is specialized
        args = (
            torch.randint(0, geo["vocab_size"], (batch, seq)),
            torch.ones(batch, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
            *[torch.zeros(batch, kv_heads, past_len, head_dim, dtype=past_dtype) for _ in names["past"]],
        )
        dims = {axis: Dim(axis) for axis in DYNAMIC_AXES}
        past_shape = {0: dims["batch"], 2: dims["past_sequence"]}
        dynamic_shapes = {
            "input_ids": {0: dims["batch"], 1: dims["sequence"]},
            "attention_mask": {0: dims["batch"], 1: dims["total_sequence"]},
            "position_ids": {0: dims["batch"], 1: dims["sequence"]},
            "past": tuple(past_shape for _ in names["past"]),
        }
        program = self._export(wrapper, args, dynamic_shapes, names["inputs"], names["outputs"], model_info)
        io = {
            "task": "causal-lm",
            "inputs": names["inputs"],
            "outputs": names["outputs"],
            "past_inputs": names["past"],
            "present_outputs": names["present"],
            "logits_output": "logits",
            "num_layers": layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": geo["vocab_size"],
            "kv_dtype": str(past_dtype).removeprefix("torch."),
            "dynamic_axes": list(DYNAMIC_AXES),
            "axes": {n: AXES[_axis_role(n)] for n in names["inputs"] + names["outputs"]},
        }
        meta = self._save(program, io, model_info, out)
        del program, wrapper
        self._reference_then_free(model)
        return meta

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        return self.verify_graph(out / MODEL, meta["io"])
