"""GPTQ and AWQ through GPT-QModel (the maintained successor of AutoGPTQ and AutoAWQ).

GPT-QModel quantizes a model loaded from a folder with a list of calibration token windows and
saves a checkpoint that transformers loads back (its GPTQ integration picks a CPU kernel). Traps
on CPU, measured with 7.6 (docs/quantization-libraries.md):

- it loads float32 checkpoints in bfloat16 unless told the dtype;
- its in-memory model after `quantize()` is not usable: the stage always works from the saved
  checkpoint, which is also what ships;
- GPTQ per-channel (group -1) needs the group-aware activation ordering off;
- AWQ runs in float16 with the plain torch backend (its automatic choice is a CUDA kernel);
- on machines with fewer than 4 cores its CPU worker pool must be sized by hand.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _exclusions(model_linears: list[str], exclude: tuple[str, ...]) -> dict[str, dict]:
    """GPT-QModel's per-module overrides: a pattern prefixed '-:' leaves matching modules unquantized."""
    import re

    from .rtn import excluded

    # the output layer is never quantized by GPT-QModel unless asked (lm_head=True): no override needed,
    # and an override makes the checkpoint's config one that transformers' loader warns about
    return {f"-:^{re.escape(name)}$": {} for name in model_linears
            if excluded(name, exclude) and name != "lm_head"}


def quantize_with_gptqmodel(source: Path, out: Path, method: str, bits: int, group_size: int, symmetric: bool,
                            windows, exclude: tuple[str, ...], damp_percent: float | None,
                            linear_names: list[str]) -> dict[str, Any]:
    """Quantize `source` into the checkpoint folder `out`; returns timing and the library's config."""
    if (os.cpu_count() or 1) < 4:
        # 7.6 sizes its CPU pool at half the cores and then asks it for 2 loader workers: on a 2-core
        # machine that is a ValueError at the first model load unless the pool is given 2 workers
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    common: dict[str, Any] = {"bits": bits, "group_size": group_size, "sym": symmetric, "offload_to_disk": False,
                              "dynamic": _exclusions(linear_names, exclude) or None}
    if method == "gptq":
        extra: dict[str, Any] = {} if group_size != -1 else {"act_group_aware": False}
        if damp_percent is not None:
            extra["damp_percent"] = damp_percent
        config = QuantizeConfig(desc_act=False, **common, **extra)
        dtype, backend = torch.float32, BACKEND.AUTO
    elif method == "awq":
        config = QuantizeConfig(method="awq", format="gemm", **common)
        dtype, backend = torch.float16, BACKEND.TORCH
    else:
        raise ValueError(f"GPT-QModel runs gptq or awq, not {method}")
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]
    with _log_files_elsewhere(), _quieter():
        model = GPTQModel.load(str(source), config, device="cpu", dtype=dtype)
        start = time.perf_counter()
        model.quantize(calibration, batch_size=min(8, len(calibration)), backend=backend)
        seconds = time.perf_counter() - start
        model.save(str(out))
        del model
    return {"quantize_seconds": seconds, "library": "gptqmodel"}


def _quieter():
    """GPT-QModel logs a table per layer at INFO; keep its warnings, the stage reports the rest."""
    import logging

    from ..logs import quieted

    try:
        from logbar import LogBar
    except ImportError:
        return contextlib.nullcontext()
    return quieted(LogBar.shared(), logging.WARNING)


@contextlib.contextmanager
def _log_files_elsewhere():
    """7.6 writes per-run log files into ./logs of whatever the working directory is; send them to a
    temporary folder that is removed afterwards."""
    import importlib

    try:
        module = importlib.import_module("gptqmodel.looper.loop_processor")
    except ImportError:
        module = None
    if module is None or not hasattr(module, "_PROJECT_LOG_DIR"):
        yield
        return
    saved = getattr(module, "_PROJECT_LOG_DIR")  # noqa: B009 (a private attribute of the library)
    with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as tmp:
        setattr(module, "_PROJECT_LOG_DIR", Path(tmp))  # noqa: B010
        try:
            yield
        finally:
            setattr(module, "_PROJECT_LOG_DIR", saved)  # noqa: B010


def build(job):
    """The quantize stage's GPTQ and AWQ methods (pipeline/quant/methods.py): GPT-QModel writes checkpoint/,
    its integers are read back and written into the FP32 model later stages export."""
    import json

    import torch

    from ..errors import StageError
    from .formats import read_checkpoint_layers
    from .methods import QuantOutcome
    from .rtn import resolve_group

    cfg = job.cfg
    info: dict[str, Any] = {}
    model, tokenizer = job.load()
    windows = job.windows(tokenizer, info)
    linears: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # a clear error before the library runs, and auto resolved to one group for every layer
    group = resolve_group({n: m.in_features for n, m in linears.items()}, cfg.group_size, cfg.exclude, info)
    info["group_size"] = group
    checkpoint = job.out / "checkpoint"
    got = quantize_with_gptqmodel(job.source, checkpoint, cfg.method, cfg.bits, group, cfg.symmetric,
                                  windows, cfg.exclude, cfg.damp_percent, list(linears))
    config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config", {})
    info.update({"library": got["library"], "checkpoint_format": config.get("checkpoint_format", config.get("format")),
                 "damp_percent": config.get("damp_percent")})
    try:
        read = read_checkpoint_layers(checkpoint, config.get("quant_method", cfg.method), cfg.bits, group)
    except (KeyError, ValueError) as exc:
        raise StageError(f"reading the {cfg.method} checkpoint's integers: {exc}") from None
    tensors, layers = {}, []
    with torch.no_grad():
        for name, layer in read.items():
            module = linears.get(name)
            if module is None or tuple(module.weight.shape) != tuple(layer.qweight.shape):
                raise StageError(f"the {cfg.method} checkpoint has a layer {name} of shape "
                                 f"{tuple(layer.qweight.shape)} that the model does not")
            module.weight.copy_(layer.dequantize())
            tensors[f"{name}.qweight"] = layer.qweight
            tensors[f"{name}.scales"] = layer.scales
            tensors[f"{name}.zeros"] = layer.zeros
            layers.append({"name": name, "in": module.in_features, "out": module.out_features, "group": layer.group})
    info["tensors_from_checkpoint"] = copy_other_tensors(checkpoint, model)
    skipped = sorted(n for n in linears if n not in read)
    return QuantOutcome(got["quantize_seconds"], layers, skipped, model, tokenizer, tensors, info)


def copy_other_tensors(checkpoint: Path, model) -> int:
    """The checkpoint's unquantized tensors (norms, embeddings, biases, excluded layers) into `model`:
    AWQ folds its scales into the norms before each quantized layer, so the original's are stale."""
    import torch
    from safetensors.torch import load_file

    from ..errors import StageError

    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for path in sorted(checkpoint.glob("*.safetensors")):
            for key, value in load_file(str(path)).items():
                if key not in state or not value.is_floating_point():
                    continue
                if tuple(value.shape) != tuple(state[key].shape):
                    raise StageError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model "
                                     f"{tuple(state[key].shape)}")
                state[key].copy_(value.to(state[key].dtype))
                copied += 1
    return copied
