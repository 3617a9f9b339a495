"""Target fingerprints: what a target-specific artifact (an engine) was built for.

Read without importing any runtime, so `enginewright plan` stays cheap.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# CPU features that change which kernels ONNX Runtime picks.
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def cpu_fingerprint() -> dict[str, object]:
    model = platform.processor() or "unknown"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "CPU part") and model in ("unknown", "", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "kind": "cpu",
        "model": model,
        "isa": sorted(f for f in CPU_FLAGS if f in flags),
        "machine": platform.machine(),
        "os": platform.system(),
    }


def ort_cpu_target(execution_provider: str) -> dict[str, object]:
    """Fingerprint of an ONNX Runtime CPU engine target."""
    return {
        "cpu": cpu_fingerprint(),
        "runtime": "onnxruntime",
        "runtime_version": package_version("onnxruntime"),
        "execution_provider": execution_provider,
    }
