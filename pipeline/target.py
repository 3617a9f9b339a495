"""Target fingerprints: what a target-specific artifact (an engine) was built for.

Read without importing any runtime, so `enginewright plan` stays cheap.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import cast

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


def int8_kernels() -> dict[str, object]:
    """Which integer MatMul kernels ONNX Runtime runs here, and whether its U8S8 kernels can saturate.

    Without VNNI (or AMX), x86 kernels multiply u8 by s8 with vpmaddubsw, which adds pairs of products into
    int16 and saturates: 255 x 127 x 2 overflows. Weights in 7 bits (reduce_range) cannot overflow there
    (255 x 64 x 2 < 32,767); with VNNI the products accumulate in int32 and 8-bit weights are exact."""
    isa = set(cast(list[str], cpu_fingerprint()["isa"]))
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    if "amx_int8" in isa:
        kind = "amx"
    elif "avx512_vnni" in isa:
        kind = "avx512-vnni"
    elif "avx_vnni" in isa:
        kind = "avx-vnni"
    elif "avx512bw" in isa:
        kind = "avx512"
    elif "avx2" in isa:
        kind = "avx2"
    else:
        kind = "other"
    saturates = x86 and kind in ("avx512", "avx2", "other")
    return {"kernels": kind, "u8s8_saturates": saturates}


def ort_cpu_target(execution_provider: str) -> dict[str, object]:
    """Fingerprint of an ONNX Runtime CPU engine target."""
    return {
        "cpu": cpu_fingerprint(),
        "runtime": "onnxruntime",
        "runtime_version": package_version("onnxruntime"),
        "execution_provider": execution_provider,
    }
