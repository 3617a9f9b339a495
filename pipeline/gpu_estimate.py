"""The memory `plan` expects an engine to need: weights per precision, the KV cache at the
TensorRT profiles' largest shapes, and a verdict against the target GPU's memory.

The target GPU's memory comes from this machine's GPU fingerprint when it has one, else from
the recipe's `engine.gpu_memory_gb`. Activations and TensorRT's workspace come on top and are
not estimated: the verdict is a floor, and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .sizing import BYTES, engine_weight_bytes, kv_cache_bytes, parameter_count, weight_bytes


@dataclass(frozen=True)
class KvEstimate:
    profile: str
    batch: int
    past_tokens: int
    total_tokens: int  # past + new tokens: the presents' length
    fp16_bytes: int  # the KV cache formula at FP16, batch x total_tokens
    io_dtype: str  # dtype of this graph's past/present tensors
    io_bytes: int  # past inputs and present outputs held at once, in io_dtype


@dataclass
class GpuEstimate:
    parameters: int
    weights: dict[str, int]  # every weight in fp32 / fp16 / int8 / int4
    engine_precision: str
    engine_weights: int
    kv: list[KvEstimate] = field(default_factory=list)
    gpu_memory: int | None = None
    gpu_source: str = ""
    warnings: list[str] = field(default_factory=list)

    geometry: dict[str, int] = field(default_factory=dict)

    def kv_per_sequence(self, tokens: int, precision: str = "fp16") -> int:
        return kv_cache_bytes(self.geometry, tokens, 1, BYTES[precision])

    @property
    def need(self) -> int:
        return self.engine_weights + max((k.io_bytes for k in self.kv), default=0)


def _kv_dtype(recipe: Recipe) -> str:
    export = recipe.stage("export")
    if export is not None and getattr(export, "kv_cache_dtype", None) == "float16":
        return "fp16"
    precision = recipe.stage("precision")
    if precision is not None and precision.mode == "fp16" and not precision.keep_io_fp32:
        return "fp16"
    return "fp32"


def estimate(recipe: Recipe, model_info: dict[str, Any], gpu) -> GpuEstimate | None:
    """None for encoders (no KV cache; nothing here is specific to them)."""
    if model_info.get("task", "causal-lm") != "causal-lm":
        return None
    config = json.loads((Path(model_info["path"]) / "config.json").read_text())
    geometry = model_info["geometry"]
    params = parameter_count(config, geometry)
    precision, quantize, engine = recipe.stage("precision"), recipe.stage("quantize"), recipe.stage("engine")
    mode = precision.mode if precision is not None else None
    group = (quantize.group_size if quantize is not None and isinstance(quantize.group_size, int)
             and quantize.group_size > 0 else 128)  # auto: 128 where the widths allow it
    est = GpuEstimate(
        parameters=params.total,
        weights={p: weight_bytes(params, p) for p in ("fp32", "fp16", "int8", "int4")},
        engine_precision=mode or "fp32",
        engine_weights=engine_weight_bytes(params, mode, bool(precision and precision.quantize_lm_head), group),
        geometry=dict(geometry),
    )
    if getattr(engine, "backend", None) == "tensorrt":
        from .tensorrt.profiles import axis_ranges

        dtype = _kv_dtype(recipe)
        for p in engine.profiles:
            ranges = axis_ranges(p)
            batch, past = ranges["batch"][2], ranges.get("past_sequence", (0, 0, 0))[2]
            total = ranges.get("total_sequence", ranges["sequence"])[2]
            io = kv_cache_bytes(geometry, past + total, batch, BYTES[dtype])
            est.kv.append(KvEstimate(p.name, batch, past, total, kv_cache_bytes(geometry, total, batch, BYTES["fp16"]),
                                     dtype, io))
            limit = config.get("max_position_embeddings")
            if limit and total > limit:
                est.warnings.append(f"profile '{p.name}' reaches {total} positions; the model was trained for "
                                    f"{limit} (max_position_embeddings)")
        if gpu is not None and gpu.present and gpu.memory_bytes:
            est.gpu_memory, est.gpu_source = gpu.memory_bytes, f"this machine's {gpu.name}"
        elif engine.gpu_memory_gb:
            est.gpu_memory, est.gpu_source = int(engine.gpu_memory_gb * 1e9), "engine.gpu_memory_gb in the recipe"
        if est.gpu_memory is None:
            est.warnings.append("no target GPU memory known (no GPU here): set engine.gpu_memory_gb in the recipe "
                                "to check the estimate against it")
        elif est.need > est.gpu_memory:
            est.warnings.append(f"the engine needs at least {est.need / 1e9:.2f} GB (weights + KV at the largest "
                                f"profile) and the target GPU has {est.gpu_memory / 1e9:.2f} GB ({est.gpu_source})")
    return est


def render(est: GpuEstimate) -> list[str]:
    from .sizing import count, gb

    lines = [f"model: {count(est.parameters)} parameters; weights "
             + ", ".join(f"{p} {gb(b)}" for p, b in est.weights.items()),
             f"engine weights ({est.engine_precision}, as the precision stage leaves them): {gb(est.engine_weights)}"]
    if est.kv:
        longest = max(k.total_tokens for k in est.kv)
        lines.append(f"KV cache per {longest}-token sequence at FP16: {gb(est.kv_per_sequence(longest))}")
    for k in est.kv:
        lines.append(f"KV cache, profile '{k.profile}' at max (batch {k.batch} x {k.total_tokens} tokens): "
                     f"{gb(k.fp16_bytes)} at FP16; this graph's {k.io_dtype} past ({k.past_tokens}) and present "
                     f"({k.total_tokens}) tensors together: {gb(k.io_bytes)}")
    if est.gpu_memory is not None:
        verdict = "fits" if est.need <= est.gpu_memory else "DOES NOT FIT"
        lines.append(f"GPU memory: needs at least {gb(est.need)} (weights + largest KV; activations and workspace "
                     f"not counted) of {gb(est.gpu_memory)} ({est.gpu_source}): {verdict}")
    lines += [f"warning: {w}" for w in est.warnings]
    return lines
