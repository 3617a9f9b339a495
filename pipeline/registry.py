"""Stage types by recipe name, in the order they run.

Each stage class carries its recipe section's config (`Stage.Config`); the recipe schema's
union of stage configs is assembled from this table, so adding a stage is its module (stage
class plus config) and one line here. An engine has one entry per backend
(`engine:<backend>`). Stage modules import their heavy libraries inside functions, so
importing them to read their configs stays cheap.
"""

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

# recipe stages in the order they run (load is implicit: the recipe's model section)
STAGE_ORDER: tuple[str, ...] = tuple(dict.fromkeys(k.partition(":")[0] for k in STAGES if k != "load"))
ENGINE_BACKENDS: tuple[str, ...] = tuple(k.partition(":")[2] for k in STAGES if k.startswith("engine:"))


def _load(ref: str) -> Any:
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


def recipe_stage_classes() -> dict[str, Any]:
    """Registry key -> stage class, for every stage a recipe may list."""
    return {key: _load(ref) for key, ref in STAGES.items() if key != "load"}


def load_stage_class() -> Any:
    return _load(STAGES["load"])


def stage_class(spec: Any) -> Any:
    name = spec.type
    backend = getattr(spec, "backend", None)
    ref = STAGES.get(f"{name}:{backend}") if backend else STAGES.get(name)
    if ref is None:
        raise KeyError(f"no stage implementation for {name!r} (backend {backend!r})")
    return _load(ref)
