"""Peak-memory estimates, so a model too large for this machine is refused by `plan` and
before a stage starts, not discovered by an out-of-memory kill.

An estimate is a fixed runtime overhead (torch, transformers and ONNX Runtime imported) plus
a multiple of the model's weights held in float32, the dtype every stage loads the PyTorch
model in today. Each stage declares its multiple (`Stage.memory_factor`): export holds the
model, its traced program and the ONNX graph at once; verification holds the PyTorch
reference and an ONNX Runtime session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


RUNTIME_OVERHEAD_BYTES = 1024**3


def peak_bytes(model_info: dict[str, Any], factor: float) -> int:
    return RUNTIME_OVERHEAD_BYTES + int(fp32_weight_bytes(model_info) * factor)


def fp32_weight_bytes(model_info: dict[str, Any]) -> int:
    stored = DTYPE_BYTES.get(model_info.get("dtype", "float32"), 4)
    return int(model_info["weights_bytes"] * 4 / stored)


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
