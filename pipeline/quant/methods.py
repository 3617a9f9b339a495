"""Quantization methods the quantize stage can run, each registering what the stage needs to know.

A method says which weight bits it takes, whether it calibrates, which distributions shape its
output (part of the cache key), whether ONNX can follow it (`exportable`), whether it leaves
per-layer integers the precision stage lowers (`weight_only`), and where its build lives. The
recipe's `method:` choices are this table's keys, and the stage dispatches through it: a method
missing here does not exist, and none falls through to another's branch.

A build takes a `QuantJob` and returns a `QuantOutcome`: the FP32 model later stages export
(None for a method ONNX cannot follow) and the integers, scales and zero points it chose.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StageError


@dataclass
class QuantJob:
    source: Path  # the original Hugging Face folder
    out: Path  # the entry being built: checkpoint/ goes here
    cfg: Any  # the stage's QuantizeConfig
    trust_remote_code: bool
    calibration: Callable[[Any], Any] | None  # tokenizer -> CalibrationWindows, for methods that calibrate
    say: Callable[[str], None] = lambda msg: None

    def load(self) -> tuple[Any, Any]:
        from ..runtime.torch_lm import load_hf_causal_lm

        return load_hf_causal_lm(self.source, self.trust_remote_code)

    def windows(self, tokenizer: Any, info: dict[str, Any]) -> Any:
        if self.calibration is None:
            raise StageError(f"method {self.cfg.method} calibrates but the recipe has no calibration section")
        calib = self.calibration(tokenizer)
        info["calibration"] = calib.identity()
        return calib.windows


@dataclass
class QuantOutcome:
    seconds: float
    layers: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    model: Any = None  # the FP32 model later stages export (saved as model/), None if not exportable
    tokenizer: Any = None
    tensors: dict[str, Any] = field(default_factory=dict)  # what qparams.safetensors holds
    info: dict[str, Any] = field(default_factory=dict)  # method-specific facts for quantization.json


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: tuple[int, ...]
    calibrates: bool
    exportable: bool
    weight_only: bool
    build_ref: str  # "module:function" taking a QuantJob, returning a QuantOutcome
    tools: tuple[str, ...] = ()
    requires: tuple[tuple[str, str], ...] = ()  # (module, install command)

    def check_installed(self) -> None:
        for module, hint in self.requires:
            if importlib.util.find_spec(module) is None:
                raise StageError(f"method {self.name} needs the Python package {module.replace('_', '-')}, which "
                                 f"is not installed: {hint}")

    def build(self, job: QuantJob) -> QuantOutcome:
        self.check_installed()
        module, _, func = self.build_ref.partition(":")
        return getattr(importlib.import_module(module), func)(job)


GPTQMODEL = (("gptqmodel", "BUILD_CUDA_EXT=0 pip install gptqmodel optimum"),)

METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("rtn", bits=(4, 8), calibrates=False, exportable=True, weight_only=True,
                build_ref="pipeline.quant.rtn:build"),
    QuantMethod("gptq", bits=(4, 8), calibrates=True, exportable=True, weight_only=True,
                build_ref="pipeline.quant.gptqmodel_runner:build", tools=("gptqmodel", "optimum"),
                requires=GPTQMODEL),
    QuantMethod("awq", bits=(4,), calibrates=True, exportable=True, weight_only=True,
                build_ref="pipeline.quant.gptqmodel_runner:build", tools=("gptqmodel", "optimum"),
                requires=GPTQMODEL),
    QuantMethod("smoothquant", bits=(8,), calibrates=True, exportable=True, weight_only=False,
                build_ref="pipeline.quant.smoothquant:build", tools=("compressed-tensors",),
                requires=(("compressed_tensors", "pip install compressed-tensors"),)),
    QuantMethod("bitsandbytes", bits=(4, 8), calibrates=False, exportable=False, weight_only=False,
                build_ref="pipeline.quant.bnb:build", tools=("bitsandbytes", "accelerate"),
                requires=(("bitsandbytes", "pip install bitsandbytes"),)),
)}
