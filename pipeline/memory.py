"""Peak-memory estimates, so a model too large for this machine is refused by `plan` and
before a stage starts, not discovered by an out-of-memory kill.

Each stage runs in a process of its own (pipeline/isolation.py), so its estimate is its own: a fixed
runtime overhead (the libraries its process imports) plus a multiple (`Stage.memory_factor`) of the weights it works
on, which are the model's in float32 (the dtype the PyTorch model is loaded in) or, for a stage reading an
ONNX graph (`memory_basis = "graph"`), the graph's weights: float32 until a precision stage has lowered
them, then that precision's bytes (pipeline/sizing.py). The first stage built that verifies against
PyTorch's outputs (`reads_reference`) loads the reference model to compute them and frees it before its
own work, so its peak is the larger of the two; later stages reuse those outputs. A stage that changes the reference model (quantize)
makes the next one compute them again. `MemoryPlan` walks a recipe's stages in that order; the factors
were measured on a 0.73 B model (README, "Past 2 GB").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


RUNTIME_OVERHEAD_BYTES = 1024**3  # a stage process with PyTorch and transformers imported
ONNX_OVERHEAD_BYTES = 300 * 1024**2  # one with ONNX and ONNX Runtime only


REFERENCE_FACTOR = 1.3  # the PyTorch model loaded in float32 to compute the reference outputs (as load: 1.27)


def lowered_fraction(model_info: dict[str, Any], mode: str) -> float:
    """The bytes of a graph lowered to `mode`, as a fraction of its float32 bytes (LLaMA layout counts from
    the config; a fixed share where the config cannot be read)."""
    import json

    from .sizing import BYTES, engine_weight_bytes, parameter_count

    try:
        config = json.loads((Path(model_info["path"]) / "config.json").read_text())
        params = parameter_count(config, model_info["geometry"])
        return engine_weight_bytes(params, mode) / max(params.total * BYTES["fp32"], 1)
    except (KeyError, OSError, ValueError, TypeError):
        return {"fp16": 0.5, "int8-dynamic": 0.3, "int8-qdq": 0.3, "int4": 0.2}.get(mode, 1.0)


class MemoryPlan:
    """The estimate of each stage of one run, in order: `estimate(stage)` before it, `passed(stage, built)`
    after it."""

    def __init__(self, model_info: dict[str, Any]) -> None:
        self.info = model_info
        self.fp32 = fp32_weight_bytes(model_info)
        self.graph_fraction = 1.0
        self.reference_pending = True

    def estimate(self, stage: Any) -> int:
        basis = self.fp32 * (self.graph_fraction if stage.memory_basis == "graph" else 1.0)
        own = stage.memory_overhead + basis * stage.memory_multiple()
        if stage.reads_reference and self.reference_pending:  # before its own work: the model loaded, then freed
            own = max(own, RUNTIME_OVERHEAD_BYTES + self.fp32 * REFERENCE_FACTOR)
        return int(own)

    def disk(self, stage: Any) -> int:
        """Bytes the stage's artifact will take on disk: its multiple (`Stage.disk_factor`) of the weights it
        writes, the graph's as this stage leaves them (a precision stage writes the lowered graph)."""
        fraction = self.graph_fraction
        mode = getattr(stage.spec, "mode", None) if stage.name == "precision" else None
        if mode is not None:
            fraction = lowered_fraction(self.info, mode)
        basis = self.fp32 * (fraction if stage.memory_basis == "graph" else 1.0)
        return int(basis * stage.disk_factor)

    def passed(self, stage: Any, built: bool) -> None:
        if stage.reads_reference and built:
            self.reference_pending = False
        if stage.changes_reference:
            self.reference_pending = True
        mode = getattr(stage.spec, "mode", None) if stage.name == "precision" else None
        if mode is not None:
            self.graph_fraction = lowered_fraction(self.info, mode)


def fp32_weight_bytes(model_info: dict[str, Any]) -> int:
    stored = DTYPE_BYTES.get(model_info.get("dtype", "float32"), 4)
    return int(model_info["weights_bytes"] * 4 / stored)


def free_disk_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent); None where unknown."""
    import shutil

    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the system (malloc_trim), so what one stage freed does not
    stay resident through the next; a no-op where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (VmRSS); None where /proc is absent."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset_peak_rss() (VmHWM), else since it started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
