"""The Polygraphy loader chain that builds a TensorRT engine, from settings stored by name.

Builder options live in BuildSettings as plain names and numbers (TensorRT 11 renumbered its
enums, so integers are never stored). They become TensorRT enum members only in
`loader_chain`, by attribute lookup on the `trt` module it is given. Networks are always
strongly typed: precision comes from the ONNX tensor types and Q/DQ nodes, and no precision
flag or calibrator is ever set (TensorRT 11 removed both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StageError

if TYPE_CHECKING:
    from ..stages.engine_trt import TensorRTEngineConfig


@dataclass(frozen=True)
class BuildSettings:
    builder_optimization_level: int = 3
    hardware_compatibility_level: str = "NONE"  # trt.HardwareCompatibilityLevel member name
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    memory_pool_limits: dict[str, int] = field(default_factory=dict)  # trt.MemoryPoolType name -> bytes
    strongly_typed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_from_spec(spec: TensorRTEngineConfig) -> BuildSettings:
    pools = {"WORKSPACE": spec.workspace_mb * 1024**2} if spec.workspace_mb else {}
    return BuildSettings(
        builder_optimization_level=spec.builder_optimization_level,
        hardware_compatibility_level=spec.hardware_compatibility_level,
        version_compatible=spec.version_compatible,
        exclude_lean_runtime=spec.exclude_lean_runtime,
        memory_pool_limits=pools,
    )


def trt_enum(trt: Any, enum: str, member: str) -> Any:
    """trt.<enum>.<member>, looked up by name; a clear error where this TensorRT lacks it."""
    holder = getattr(trt, enum, None)
    if holder is None or not hasattr(holder, member):
        version = getattr(trt, "__version__", "?")
        raise StageError(f"TensorRT {version} has no {enum}.{member}; choose another value in the recipe")
    return getattr(holder, member)


def loader_chain(onnx_path: Path, plan_path: Path, profiles: list, settings: BuildSettings, trt: Any,
                 timing_cache: Path | None = None):
    """SaveEngine(EngineFromNetwork(NetworkFromOnnxPath, CreateConfig)): lazy until called.

    `profiles` are Polygraphy Profile objects (tensorrt.profiles.to_polygraphy); `trt` is the
    module enum names are resolved against; `timing_cache` is loaded before and saved after
    the build (the caller holds its lock)."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    if not settings.strongly_typed:
        raise StageError("only strongly typed networks are built (precision comes from the ONNX graph)")
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    pools = {trt_enum(trt, "MemoryPoolType", name): size for name, size in settings.memory_pool_limits.items()}
    config = CreateConfig(
        profiles=profiles,
        builder_optimization_level=settings.builder_optimization_level,
        hardware_compatibility_level=trt_enum(trt, "HardwareCompatibilityLevel",
                                              settings.hardware_compatibility_level),
        version_compatible=settings.version_compatible,
        exclude_lean_runtime=settings.exclude_lean_runtime,
        memory_pool_limits=pools or None,
        load_timing_cache=str(timing_cache) if timing_cache is not None else None,
    )
    engine = EngineFromNetwork(network, config=config,
                               save_timing_cache=str(timing_cache) if timing_cache is not None else None)
    return SaveEngine(engine, path=str(plan_path))
