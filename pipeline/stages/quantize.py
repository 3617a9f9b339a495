"""quantize: quantization of the PyTorch model, before export.

Methods (recipe field `method`):

    rtn           round-to-nearest weight-only, INT8 per channel or INT4 per group: the reference
    gptq, awq     weight-only with calibration, through GPT-QModel (pipeline/quant/gptqmodel_runner.py)
    smoothquant   W8A8 INT8: smoothing folded into norms and weights, static per-tensor activations
                  (pipeline/quant/smoothquant.py)
    bitsandbytes  NF4 / FP4 / LLM.int8() for the PyTorch runtime (pipeline/quant/bnb.py)

The entry holds

    checkpoint/            the quantized Hugging Face checkpoint transformers loads back and runs, in
                           the method's serving format (GPTQ v1, AWQ GEMM, compressed-tensors W8A8,
                           bitsandbytes); absent for rtn, whose model/ is its checkpoint
    model/                 the FP32 model later stages export: the dequantized weights (q - zero) * scale
                           for weight-only methods, the smoothed FP model for smoothquant; absent for
                           bitsandbytes, which cannot be exported
    qparams.safetensors    the integers a lowering into ONNX reproduces, per layer: `.qweight` (uint8
                           [out, in]), `.scales` (float32 [out, in / group]), `.zeros` (uint8) for
                           weight-only methods; `.qweight` (int8), `.weight_scale`, `.input_scale` and
                           `.smooth` for smoothquant
    quantization.json      method, parameters, calibration identity, layers and layers left out

Verification runs on the checkpoint as reloaded from disk (never the model in memory) against the
original on held-out text: perplexity and its change, mean KL of next-token distributions, top-1
agreement; for weight-only methods it also checks that the extracted integers are what the
checkpoint's own kernels compute with.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..cache import Entry
from ..calibration import calibration_windows
from ..errors import StageError
from ..memory import peak_rss_bytes, reset_peak_rss
from .base import Stage, Verification

METHOD_TOOLS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel", "optimum"),
                "smoothquant": ("compressed-tensors",), "bitsandbytes": ("bitsandbytes", "accelerate")}
# model/ of a weight-only method must compute what the checkpoint computes, up to the serving kernels'
# rounding (GPT-QModel's CPU kernels run in bfloat16)
EXPORT_MODEL_MAX_KL = 2e-3
# smoothing is an exact rewrite of the FP model (float rounding only)
SMOOTHED_MAX_KL = 1e-6
INSTALL_HINT = {"gptqmodel": "BUILD_CUDA_EXT=0 pip install gptqmodel optimum",
                "compressed_tensors": "pip install compressed-tensors", "bitsandbytes": "pip install bitsandbytes"}


def _require(module: str, method: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise StageError(f"method {method} needs the Python package {module.replace('_', '-')}, which is not "
                         f"installed: {INSTALL_HINT.get(module, 'pip install ' + module)}")


class QuantizeStage(Stage):
    name = "quantize"
    version = 4
    memory_factor = 4.0

    @property
    def tools(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("torch", "transformers", "safetensors") + METHOD_TOOLS.get(self.spec.method, ())

    # -- build ---------------------------------------------------------------------------------

    def _windows(self, tokenizer):
        cal = self.spec.calibration
        calib = calibration_windows(tokenizer, cal.text, cal.samples, cal.seq_len, cal.seed,
                                    self.ctx.recipe.path.parent, where=f"{self.ctx.recipe.path}: "
                                                                       "stages.quantize.calibration")
        return calib

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        spec = self.spec
        source = self.ctx.recipe.model_path
        trust = self.ctx.recipe.recipe.model.trust_remote_code
        info: dict[str, Any] = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                                "symmetric": spec.symmetric, "exclude": list(spec.exclude)}
        self.ctx.say(f"quantizing: {self._label()}")
        windowed = reset_peak_rss()
        start = time.perf_counter()
        if spec.method == "bitsandbytes":
            _require("bitsandbytes", spec.method)
            from ..quant.bnb import quantize_with_bitsandbytes

            got = quantize_with_bitsandbytes(source, out / "checkpoint", spec.bnb_type, bool(spec.double_quant),
                                             spec.exclude, trust)
            info.update({"bnb_type": spec.bnb_type, "double_quant": spec.double_quant, "layers": got["layers"],
                         "library": got["library"]})
            seconds = got["quantize_seconds"]
        else:
            seconds = self._build_exportable(source, out, info)
        total = time.perf_counter() - start
        generation = source / "generation_config.json"
        for folder in (out / "model", out / "checkpoint"):
            if folder.is_dir() and generation.is_file() and not (folder / generation.name).is_file():
                shutil.copy2(generation, folder / generation.name)
        if (out / "checkpoint").is_dir():
            info["checkpoint_bytes"] = sum(p.stat().st_size for p in (out / "checkpoint").glob("*.safetensors"))
        (out / "quantization.json").write_text(json.dumps(info, indent=2) + "\n")
        peak = peak_rss_bytes()
        model_info = dict(parent.meta["stage_meta"]["model"])
        shipped = out / "model" if (out / "model").is_dir() else out / "checkpoint"
        model_info["weights_bytes"] = sum(p.stat().st_size for p in shipped.glob("*.safetensors"))
        return {"model": model_info, "quantization": info, "quantize_seconds": seconds, "stage_seconds": total,
                "peak_rss_bytes": peak, "peak_rss_scope": "this stage's build" if windowed else "the process"}

    def _label(self) -> str:
        s = self.spec
        if s.method == "bitsandbytes":
            return f"bitsandbytes {s.bnb_type}"
        if s.method == "smoothquant":
            return "W8A8 without smoothing" if s.alpha is None else f"SmoothQuant W8A8 alpha {s.alpha}"
        group = "per channel" if s.group_size == -1 else f"group {s.group_size}"
        return f"{s.method.upper()} W{s.bits} {group} {'symmetric' if s.symmetric else 'asymmetric'}"

    def _build_exportable(self, source: Path, out: Path, info: dict[str, Any]) -> float:
        import torch
        from safetensors.torch import save_file

        from ..runtime.torch_lm import load_hf_causal_lm

        spec = self.spec
        model, tokenizer = load_hf_causal_lm(source, self.ctx.recipe.recipe.model.trust_remote_code)
        calib = self._windows(tokenizer) if spec.calibration is not None else None
        if calib is not None:
            info["calibration"] = calib.identity()
        if spec.method == "rtn":
            from ..quant.rtn import quantize_rtn

            t0 = time.perf_counter()
            tensors, layers, skipped = quantize_rtn(model, spec.bits, spec.group_size, spec.symmetric, spec.exclude)
            seconds = time.perf_counter() - t0
        elif spec.method in ("gptq", "awq"):
            tensors, layers, skipped, seconds = self._gptqmodel(source, out, model, calib.windows, info)
        else:
            _require("compressed_tensors", spec.method)
            from ..quant.smoothquant import quantize_w8a8, save_w8a8_checkpoint

            result = quantize_w8a8(model, calib.windows, spec.exclude, spec.alpha)
            tensors, layers, skipped, seconds = result.tensors, result.layers, result.excluded, result.seconds
            info["smoothing"] = result.smoothing
            save_w8a8_checkpoint(model, tokenizer, result, out / "checkpoint")
        if not layers:
            raise StageError(f"no Linear layer of {source} was quantized (all excluded by {list(spec.exclude)})")
        info.update({"layers": layers, "excluded": skipped})
        if spec.weight_only:
            info["zero_point"] = "unsigned, weight = (qweight - zeros) * scales"
        with torch.no_grad():
            model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "qparams.safetensors"))
        return seconds

    def _gptqmodel(self, source: Path, out: Path, model, windows, info: dict[str, Any]):
        """Quantize with GPT-QModel into checkpoint/, read its integers back, write them into `model`."""
        import torch

        from ..quant.formats import read_checkpoint_layers
        from ..quant.gptqmodel_runner import quantize_with_gptqmodel
        from ..quant.rtn import excluded, group_for

        spec = self.spec
        _require("gptqmodel", spec.method)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, module in linears.items():
            if not excluded(name, spec.exclude):
                group_for(name, module.in_features, spec.group_size)  # a clear error before the library runs
        got = quantize_with_gptqmodel(source, out / "checkpoint", spec.method, spec.bits, spec.group_size,
                                      spec.symmetric, windows, spec.exclude, spec.damp_percent, list(linears))
        config = json.loads((out / "checkpoint" / "config.json").read_text()).get("quantization_config", {})
        info.update({"library": got["library"], "checkpoint_format": config.get("checkpoint_format",
                                                                                 config.get("format")),
                     "damp_percent": config.get("damp_percent")})
        try:
            read = read_checkpoint_layers(out / "checkpoint", config.get("quant_method", spec.method), spec.bits,
                                          spec.group_size)
        except (KeyError, ValueError) as exc:
            raise StageError(f"reading the {spec.method} checkpoint's integers: {exc}") from None
        tensors, layers = {}, []
        with torch.no_grad():
            for name, layer in read.items():
                module = linears.get(name)
                if module is None or tuple(module.weight.shape) != tuple(layer.qweight.shape):
                    raise StageError(f"the {spec.method} checkpoint has a layer {name} of shape "
                                     f"{tuple(layer.qweight.shape)} that the model does not")
                module.weight.copy_(layer.dequantize())
                tensors[f"{name}.qweight"] = layer.qweight
                tensors[f"{name}.scales"] = layer.scales
                tensors[f"{name}.zeros"] = layer.zeros
                layers.append({"name": name, "in": module.in_features, "out": module.out_features,
                               "group": layer.group})
        copied = self._copy_other_tensors(out / "checkpoint", model)
        info["tensors_from_checkpoint"] = copied
        skipped = sorted(n for n in linears if n not in read)
        return tensors, layers, skipped, got["quantize_seconds"]

    @staticmethod
    def _copy_other_tensors(checkpoint: Path, model) -> int:
        """The checkpoint's unquantized tensors (norms, embeddings, biases, excluded layers) into `model`:
        AWQ folds its scales into the norms before each quantized layer, so the original's are stale."""
        import torch
        from safetensors.torch import load_file

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

    # -- verify --------------------------------------------------------------------------------

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        from ..verify.quality import agreement, quality_against_original

        checkpoint = out / "checkpoint" if (out / "checkpoint").is_dir() else out / "model"
        self.ctx.say(f"verifying the reloaded checkpoint {checkpoint.name}/ against the original")
        metrics = quality_against_original(self.ctx, checkpoint)
        quant = meta["quantization"]
        metrics.update({"quantize_seconds": meta["quantize_seconds"], "stage_seconds": meta["stage_seconds"],
                        "peak_rss_mb": meta["peak_rss_bytes"] / 1e6,
                        "peak_rss_scope": meta.get("peak_rss_scope", "the process"),
                        "quantized_layers": len(quant["layers"])})
        failures: list[str] = []
        notes = [f"gates: {self.spec.gates()}", f"left unquantized: {', '.join(quant.get('excluded', [])) or 'none'}"]
        if checkpoint.name == "checkpoint" and (out / "model").is_dir():
            export_metrics = quality_against_original(self.ctx, out / "model")
            metrics["export_model"] = {k: export_metrics[k] for k in ("kl_mean", "top1_agreement", "perplexity")}
            same = agreement(self.ctx, checkpoint, out / "model")
            metrics["export_model"].update({"kl_to_checkpoint": same["kl_mean"],
                                            "top1_to_checkpoint": same["top1_agreement"]})
            notes.append("export_model: the FP32 model/ later stages export (dequantized or smoothed weights), "
                         "against the original and against the checkpoint")
            if self.spec.weight_only and not same["kl_mean"] <= EXPORT_MODEL_MAX_KL:
                failures.append(f"the FP32 model/ for export is not the checkpoint's model: KL between them "
                                f"{same['kl_mean']:.3g} > {EXPORT_MODEL_MAX_KL:g}")
            if self.spec.method == "smoothquant" and not export_metrics["kl_mean"] <= SMOOTHED_MAX_KL:
                failures.append(f"the smoothed FP32 model/ is not the original model: "
                                f"KL {export_metrics['kl_mean']:.3g} > {SMOOTHED_MAX_KL:g}")
        if self.spec.weight_only and checkpoint.name == "checkpoint":
            worst = self._kernel_agreement(checkpoint, out)
            metrics["kernel_weight_max_rel_diff"] = worst
            if not worst <= 5e-2:
                failures.append(f"the extracted integers differ from what the checkpoint's kernels compute with "
                                f"(max relative weight difference {worst:.3g} > 5e-2): the layout was misread")
        gates = self.spec.gates()
        if gates.get("max_kl_mean") is not None and not metrics["kl_mean"] <= gates["max_kl_mean"]:
            failures.append(f"kl_mean {metrics['kl_mean']:.4g} > max_kl_mean {gates['max_kl_mean']:g}")
        if gates.get("min_top1_agreement") is not None and not metrics["top1_agreement"] >= gates["min_top1_agreement"]:
            failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < min_top1_agreement "
                            f"{gates['min_top1_agreement']:g}")
        limit = gates.get("max_perplexity_increase")
        if limit is not None and not metrics["perplexity_change"] <= limit:
            failures.append(f"perplexity {metrics['perplexity']:.3f} is {metrics['perplexity_change']:+.1%} from "
                            f"{metrics['perplexity_ref']:.3f} > max_perplexity_increase {limit:g}")
        return Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)

    def _kernel_agreement(self, checkpoint: Path, out: Path, probe_columns: int = 256) -> float:
        """Largest relative difference between the extracted dequantized weights and the effective weights
        of the reloaded checkpoint's own modules, probed with identity inputs on the first input channels."""
        import torch
        from safetensors.torch import load_file

        reloaded, _ = self.ctx.model_at(checkpoint)
        params = load_file(str(out / "qparams.safetensors"))
        modules = dict(reloaded.named_modules())
        worst = 0.0
        from ..quant.formats import LayerQuant

        for layer in json.loads((out / "quantization.json").read_text())["layers"]:
            name = layer["name"]
            mine = LayerQuant(params[f"{name}.qweight"], params[f"{name}.scales"], params[f"{name}.zeros"],
                              layer["group"]).dequantize()
            k = min(probe_columns, layer["in"])
            module = modules[name]
            probe = torch.zeros(k, layer["in"], dtype=torch.float32)
            probe[:, :k] = torch.eye(k)
            with torch.no_grad():
                effective = module(probe).float()
                bias = getattr(module, "bias", None)
                if bias is not None:
                    effective = effective - bias.float()
            diff = (effective.T - mine[:, :k]).abs().max().item()
            worst = max(worst, diff / max(mine.abs().max().item(), 1e-12))
        return worst

    def describe(self, entry: Entry) -> str:
        folder = entry.file("checkpoint")
        return str(folder if folder.is_dir() else entry.file("model"))
