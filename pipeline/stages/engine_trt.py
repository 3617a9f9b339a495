"""engine (tensorrt): a serialized TensorRT engine built from the lowered ONNX graph.

Built with Polygraphy's lazy loaders (pipeline/tensorrt/build.py): a strongly typed network
parsed from the file (external data included), one optimization profile per recipe profile
mapped onto the graph's named axes, builder options resolved by name, and the GPU's timing
cache loaded and saved under its lock. The key carries the GPU fingerprint and the TensorRT
version, so an engine built elsewhere is never served. Where there is no NVIDIA GPU or no
TensorRT, the stage refuses before it starts (ResourceError) and earlier entries stay cached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..cache import Entry
from ..errors import ResourceError, StageError
from .base import Stage, Verification


class TensorRTEngineStage(Stage):
    name = "engine"
    version = 1
    target_specific = True
    tools = ("polygraphy",)
    memory_factor = 2.0  # host side: the parsed network holds the weights once more

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("gpu_memory_gb", None)  # only informs plan's estimate
        return cfg

    def target(self) -> dict[str, Any]:
        return {"runtime": "tensorrt", "gpu": self.ctx.gpu().key()}

    def _before(self) -> str:
        names = [s.type for s in self.ctx.recipe.recipe.stages]
        return names[names.index("engine") - 1]

    def _missing(self) -> str | None:
        gpu = self.ctx.gpu()
        if not gpu.can_build:
            return gpu.why_not()
        if importlib.util.find_spec("polygraphy") is None:
            return "polygraphy is not installed (pip install polygraphy)"
        return None

    def plan_note(self) -> str | None:
        self._check_profiles()
        missing = self._missing()
        return f"cannot build here: {missing}" if missing else None

    def _check_profiles(self) -> None:
        from ..tensorrt.profiles import check_decoder_axes

        check_decoder_axes(self.spec.profiles, self.ctx.task, str(self.ctx.recipe.path))

    def preflight(self) -> None:
        self._check_profiles()
        missing = self._missing()
        if missing:
            recipe = self.ctx.recipe.path
            raise ResourceError(
                f"stage 'engine' (backend tensorrt) needs an NVIDIA GPU with TensorRT and this machine cannot build "
                f"it: {missing}. Every stage before it is cached; `enginewright run {recipe} --until "
                f"{self._before()}` stops before the engine, and a machine with a GPU and TensorRT builds the "
                "engine from the same cache")

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import tensorrt as trt

        from ..tensorrt.build import loader_chain, settings_from_spec
        from ..tensorrt.profiles import derive_profiles, graph_inputs, to_polygraphy
        from ..tensorrt.timing import TimingCacheStore, timing_cache_key

        onnx_path = parent.file("model.onnx")
        derived = derive_profiles(self.spec.profiles, graph_inputs(onnx_path), str(self.ctx.recipe.path))
        settings = settings_from_spec(self.spec)
        gpu = self.ctx.gpu()
        plan_path = out / "model.plan"
        self.ctx.say(f"building a TensorRT {trt.__version__} engine on {gpu.describe()}")
        timing_key = timing_cache_key(gpu.key(), settings.hardware_compatibility_level)
        try:  # Polygraphy logs to stdout, which `run --json` keeps for the report
            with contextlib.redirect_stdout(sys.stderr):
                if self.spec.timing_cache:
                    with TimingCacheStore(self.ctx.cache).open(timing_key) as timing:
                        loader_chain(onnx_path, plan_path, to_polygraphy(derived), settings, trt, timing)()
                else:
                    loader_chain(onnx_path, plan_path, to_polygraphy(derived), settings, trt)()
        except StageError:
            raise
        except Exception as exc:  # TensorRT and Polygraphy raise their own types
            raise StageError(f"TensorRT could not build an engine from {onnx_path}: {exc}") from exc
        shutil.copy2(parent.file("io.json"), out / "io.json")
        engine = {"tensorrt": trt.__version__, "gpu": gpu.key(), "settings": settings.to_dict(),
                  "profiles": [d.to_dict() for d in derived],
                  "timing_cache": timing_key if self.spec.timing_cache else None}
        (out / "engine.json").write_text(json.dumps(engine, indent=2) + "\n")
        return {"io": parent.meta["stage_meta"]["io"], "engine": engine, "target": self.target(),
                "plan_bytes": plan_path.stat().st_size}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        from ..verify.trt_check import verify_trt_engine

        with contextlib.redirect_stdout(sys.stderr):
            return verify_trt_engine(self.ctx, self.spec, out / "model.plan", parent.file("model.onnx"), meta)

    def describe(self, entry: Entry) -> str:
        return str(entry.file("model.plan"))
