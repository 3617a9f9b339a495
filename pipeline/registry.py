"""Stage types by recipe name, imported only when a stage is used."""

from __future__ import annotations

import importlib
from typing import Any

STAGES: dict[str, str] = {
    "load": "pipeline.stages.load:LoadStage",
    "quantize": "pipeline.stages.quantize:QuantizeStage",
    "export": "pipeline.stages.export:ExportStage",
    "simplify": "pipeline.stages.simplify:SimplifyStage",
    "precision": "pipeline.stages.precision:PrecisionStage",
    "engine:onnxruntime": "pipeline.stages.engine_ort:OrtEngineStage",
    "engine:tensorrt": "pipeline.stages.engine_trt:TensorRTEngineStage",
    "package": "pipeline.stages.package:PackageStage",
}


def stage_class(spec: Any) -> type:
    name = spec.type
    backend = getattr(spec, "backend", None)
    ref = STAGES.get(f"{name}:{backend}") if backend else STAGES.get(name)
    if ref is None:
        raise KeyError(f"no stage implementation for {name!r} (backend {backend!r})")
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)
