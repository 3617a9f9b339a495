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
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import artifact_record, onnx_input
from ..cache import Entry
from ..config import Strict
from ..errors import ResourceError, StageError
from ..tensorrt.profiles import TrtProfile
from ..verify.result import Verification
from .base import Stage

PLAN = "model.plan"


class TrtCompare(Strict):
    """How the TensorRT engine is checked against ONNX Runtime on the same feeds (GPU only)."""

    atol: float = Field(default=1e-2, gt=0)
    rtol: float = Field(default=1e-2, ge=0)
    outputs: Literal["logits", "all"] = Field(default="all", description="'all' compares the KV presents too.")
    latency: bool = True
    fp16_baseline: bool = Field(default=True, description="Time a PyTorch FP16 CUDA baseline beside the engine.")


class TensorRTEngineConfig(Strict):
    type: Literal["engine"]
    backend: Literal["tensorrt"]
    profiles: tuple[TrtProfile, ...] = Field(min_length=1)
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    hardware_compatibility_level: Literal["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"] = Field(
        default="NONE", description="trt.HardwareCompatibilityLevel member, by name.")
    version_compatible: bool = Field(default=False, description="An engine later TensorRT versions can run.")
    exclude_lean_runtime: bool = False
    timing_cache: bool = Field(default=True, description="Reuse tactic timings per GPU and TensorRT version.")
    workspace_mb: int | None = Field(default=None, ge=1, description="trt.MemoryPoolType.WORKSPACE limit.")
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="Memory of the target GPU, for plan's estimate where no GPU is visible.")
    compare: TrtCompare = TrtCompare()

    @model_validator(mode="after")
    def _options(self) -> TensorRTEngineConfig:
        names = [p.name for p in self.profiles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"profile names must be unique; repeated: {', '.join(dupes)}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ValueError("exclude_lean_runtime needs version_compatible: true")
        return self

    def max_batch(self) -> int:
        return max(p.axes["batch"].max for p in self.profiles)


class TensorRTEngineStage(Stage):
    name = "engine"
    Config: ClassVar[type] = TensorRTEngineConfig
    version = 2
    target_specific = True
    tools = ("polygraphy",)
    memory_factor = 2.0  # host side: the parsed network holds the weights once more
    memory_basis = "graph"
    disk_factor = 1.0  # the serialized engine holds the weights once
    reads_reference = True

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

        source = onnx_input(parent)
        onnx_path = source.model
        derived = derive_profiles(self.spec.profiles, graph_inputs(onnx_path), str(self.ctx.recipe.path))
        settings = settings_from_spec(self.spec)
        gpu = self.ctx.gpu()
        plan_path = out / PLAN
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
        shutil.copy2(source.io_file, out / "io.json")
        engine = {"tensorrt": trt.__version__, "gpu": gpu.key(), "settings": settings.to_dict(),
                  "profiles": [d.to_dict() for d in derived],
                  "timing_cache": timing_key if self.spec.timing_cache else None}
        (out / "engine.json").write_text(json.dumps(engine, indent=2) + "\n")
        return {"artifact": artifact_record("engine", serving=self.serving(onnx_path)), "io": source.io,
                "engine": engine, "target": self.target(), "plan_bytes": plan_path.stat().st_size}

    def serving(self, onnx_path: Path) -> dict[str, Any]:
        """How a server loads this engine: Triton's tensorrt backend, one instance profile per recipe profile,
        with the tensors of the graph it was built from."""
        import onnx

        from ..tensorrt.profiles import graph_inputs_of, graph_outputs_of

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        return {"triton_backend": "tensorrt", "files": [PLAN],
                "tensors": {"inputs": [asdict(t) for t in graph_inputs_of(graph)],
                            "outputs": [asdict(t) for t in graph_outputs_of(graph)]},
                "profiles": [str(i) for i in range(len(self.spec.profiles))]}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        from ..verify.trt_check import verify_trt_engine

        with contextlib.redirect_stdout(sys.stderr):
            return verify_trt_engine(self.ctx, self.spec, out / PLAN, onnx_input(parent).model, meta)

    def describe(self, entry: Entry) -> str:
        return str(entry.file(PLAN))
