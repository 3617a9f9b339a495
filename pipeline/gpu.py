"""GPU fingerprint: what a TensorRT engine and its timing cache are specific to.

Read without TensorRT where possible: `nvidia-smi` for the GPU, its compute capability, memory
and the driver; the SM count from torch.cuda or cuda-python when one of them is installed;
TensorRT's version from package metadata. Where there is no NVIDIA GPU, the result says so
(`present` is False, `reason` says why) instead of raising, so `plan` can explain.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12")
SMI_FIELDS = ("name", "compute_cap", "memory.total", "driver_version")


@dataclass(frozen=True)
class GpuFingerprint:
    present: bool
    reason: str = ""  # why no GPU (or no TensorRT) was found
    name: str | None = None
    compute_capability: str | None = None
    sm_count: int | None = None
    memory_bytes: int | None = None
    driver: str | None = None
    cuda: str | None = None
    tensorrt: str | None = None
    os: str = field(default_factory=platform.system)
    arch: str = field(default_factory=platform.machine)

    @property
    def can_build(self) -> bool:
        return self.present and self.tensorrt is not None

    def why_not(self) -> str:
        if not self.present:
            return self.reason or "no NVIDIA GPU found"
        if self.tensorrt is None:
            return "TensorRT is not installed (import tensorrt fails)"
        return ""

    def key(self) -> dict[str, Any]:
        """What an engine is specific to: all of it except the free-text reason."""
        d = asdict(self)
        d.pop("reason")
        return d

    def describe(self) -> str:
        if not self.present:
            return f"no GPU ({self.reason})" if self.reason else "no GPU"
        mem = f", {self.memory_bytes / 1024**3:.0f} GiB" if self.memory_bytes else ""
        return (f"{self.name} (sm_{(self.compute_capability or '?').replace('.', '')}, {self.sm_count or '?'} SMs"
                f"{mem}), driver {self.driver}, CUDA {self.cuda}, TensorRT {self.tensorrt or 'absent'}")


def tensorrt_version() -> str | None:
    """Version of an importable TensorRT; None when absent (PyPI's source stubs install no module)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def parse_smi(csv_line: str) -> dict[str, Any]:
    """One line of `nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version
    --format=csv,noheader,nounits`."""
    parts = [p.strip() for p in csv_line.split(",")]
    if len(parts) != len(SMI_FIELDS):
        raise ValueError(f"unexpected nvidia-smi output: {csv_line!r}")
    name, cc, mem_mib, driver = parts
    return {"name": name, "compute_capability": cc, "memory_bytes": int(float(mem_mib)) * 1024**2, "driver": driver}


def parse_smi_cuda(header: str) -> str | None:
    """'CUDA Version: 12.4' from nvidia-smi's banner: the newest CUDA the driver supports."""
    marker = "CUDA Version:"
    if marker not in header:
        return None
    return header.split(marker, 1)[1].split()[0].strip(" |")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout


def _sm_count(index: int) -> tuple[int | None, str | None]:
    """SM count and CUDA runtime version from torch or cuda-python, when either is installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(index).multi_processor_count, torch.version.cuda
    if importlib.util.find_spec("cuda") is not None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

            err, props = cudart.cudaGetDeviceProperties(index)
            err2, version = cudart.cudaRuntimeGetVersion()
            if int(err) == 0:
                cuda = f"{version // 1000}.{(version % 1000) // 10}" if int(err2) == 0 else None
                return int(props.multiProcessorCount), cuda
        except Exception:  # an old or broken cuda-python: the SM count stays unknown
            pass
    return None, None


def detect_gpu(index: int = 0, run: Callable[[list[str]], str] = _run) -> GpuFingerprint:
    """The fingerprint of GPU `index` on this machine, or one that says why there is none."""
    trt = tensorrt_version()
    if shutil.which("nvidia-smi") is None and run is _run:
        return GpuFingerprint(present=False, reason="nvidia-smi not found: no NVIDIA driver", tensorrt=trt)
    try:
        lines = run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"])
        banner = run(["nvidia-smi"])
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuFingerprint(present=False, reason=f"nvidia-smi failed: {exc}", tensorrt=trt)
    rows = [line for line in lines.splitlines() if line.strip()]
    if len(rows) <= index:
        return GpuFingerprint(present=False, reason=f"nvidia-smi lists {len(rows)} GPU(s), no GPU {index}",
                              tensorrt=trt)
    info = parse_smi(rows[index])
    sm_count, cuda_runtime = _sm_count(index)
    return GpuFingerprint(present=True, sm_count=sm_count, cuda=cuda_runtime or parse_smi_cuda(banner),
                          tensorrt=trt, **info)
