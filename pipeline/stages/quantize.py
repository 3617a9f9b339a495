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
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import Artifact, artifact_record
from ..cache import Entry
from ..calibration import calibration_windows
from ..config import Strict
from ..errors import StageError
from ..memory import peak_rss_bytes, reset_peak_rss
from ..quant.methods import METHODS, QuantJob, QuantMethod
from ..verify.policy import Policy, QuantizeGates, quantize_policy
from ..verify.result import Verification
from .base import Stage

# model/ of a weight-only method must compute what the checkpoint computes, up to the serving kernels'
# rounding (GPT-QModel's CPU kernels run in bfloat16)
EXPORT_MODEL_MAX_KL = 2e-3
# smoothing is an exact rewrite of the FP model (float rounding only)
SMOOTHED_MAX_KL = 1e-6
# what the extracted integers may differ from the checkpoint's own kernels (relative weight)
KERNEL_MAX_REL_DIFF = 5e-2


class QuantizeCalibration(Strict):
    """Calibration windows for the quantize stage (the text's content hash is part of the cache key)."""

    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=64, ge=1, le=4096)
    seq_len: int = Field(default=128, ge=8, le=8192)
    seed: int = 0


MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


class QuantizeConfig(Strict):
    type: Literal["quantize"]
    method: MethodName = Field(  # type: ignore[valid-type]
        description="rtn: round-to-nearest weight-only (the reference); gptq, awq: weight-only with calibration "
                    "(GPT-QModel); smoothquant: W8A8 INT8 with smoothing; bitsandbytes: NF4/FP4/LLM.int8() "
                    "for the PyTorch runtime only.")
    bits: Literal[4, 8] | None = Field(default=None, description="Weight bits; default 4 (smoothquant: 8).")
    group_size: int | Literal["auto"] | None = Field(
        default=None, description="Input channels per scale; -1: one scale per output channel; auto: 128, or the "
                                  "largest of 64, 32, 16 that divides every quantized layer (reported). "
                                  "Default auto for 4 bits, -1 for 8 bits. A number given is used as given.")
    symmetric: bool | None = Field(default=None, description="Default: asymmetric for 4 bits, symmetric for 8 bits.")
    exclude: tuple[str, ...] = Field(default=("lm_head",), description="Linear layers (name suffixes) kept in FP32.")
    calibration: QuantizeCalibration | None = Field(default=None, description="gptq, awq, smoothquant.")
    damp_percent: float | None = Field(default=None, gt=0, lt=1, description="gptq: Hessian dampening.")
    alpha: float | None = Field(default=None, ge=0, le=1,
                                description="smoothquant: migration strength (0: none, 1: all to the weights), default "
                                            "0.5; null: no smoothing at all (plain W8A8, for comparison).")
    bnb_type: Literal["nf4", "fp4", "int8"] | None = Field(default=None, description="bitsandbytes: nf4 (default), "
                                                                                     "fp4 or int8 (LLM.int8()).")
    double_quant: bool | None = Field(default=None, description="bitsandbytes 4-bit: quantize the scales too.")
    verify: QuantizeGates | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            return data
        data = dict(data)
        method = data["method"]
        if method == "bitsandbytes":
            kind = data.setdefault("bnb_type", "nf4")
            if "group_size" in data and data["group_size"] not in (None, -1):
                raise ValueError("bitsandbytes fixes its own block size (64 for 4-bit); remove group_size")
            data.setdefault("bits", 8 if kind == "int8" else 4)
            if kind != "int8":
                data.setdefault("double_quant", True)
        data.setdefault("bits", 8 if method == "smoothquant" else 4)
        bits = data["bits"]
        data.setdefault("group_size", "auto" if bits == 4 and method != "bitsandbytes" else -1)
        data.setdefault("symmetric", bits == 8)
        if method == "smoothquant":
            data.setdefault("alpha", 0.5)  # an explicit null stays: plain W8A8 with the same calibration
        if METHODS[method].calibrates:
            data.setdefault("calibration", {})
        return data

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        method = self.quant_method
        if self.bits not in method.bits:
            raise ValueError(f"method {method.name} quantizes to {' or '.join(map(str, method.bits))} bits, "
                             f"not {self.bits}")
        if isinstance(self.group_size, int) and self.group_size != -1 and self.group_size < 2:
            raise ValueError(f"group_size must be -1 (per output channel) or at least 2, got {self.group_size}")
        if self.calibration is not None and not method.calibrates:
            raise ValueError(f"method {method.name} does not calibrate; remove the calibration section")
        only = {"alpha": "smoothquant", "damp_percent": "gptq", "bnb_type": "bitsandbytes",
                "double_quant": "bitsandbytes"}
        for name, owner in only.items():
            if getattr(self, name) is not None and method.name != owner:
                raise ValueError(f"{name} is a {owner} parameter; method {method.name} does not take it")
        if method.name == "smoothquant" and (self.group_size != -1 or not self.symmetric):
            raise ValueError("smoothquant quantizes weights symmetric per output channel: use group_size -1 "
                             "and symmetric true (or leave both out)")
        if method.name == "awq" and (self.group_size == -1 or self.symmetric):
            raise ValueError("awq here is asymmetric per group (the GEMM layout): set a group_size such as 128 "
                             "and symmetric false (or leave both out)")
        if method.name == "bitsandbytes" and (self.bits == 8) != (self.bnb_type == "int8"):
            raise ValueError(f"bnb_type {self.bnb_type} is {4 if self.bits == 8 else 8}-bit; bits says "
                             f"{self.bits}: leave bits out")
        if self.group_size == "auto" and self.bits != 4:
            raise ValueError("group_size auto is for 4-bit weights; 8-bit weights are per output channel (-1)")
        if method.name == "gptq" and self.bits == 8 and self.group_size != -1:
            raise ValueError("gptq 8-bit is per output channel here: group_size -1")
        return self

    @property
    def quant_method(self) -> QuantMethod:
        return METHODS[self.method]

    def gates(self) -> Policy:
        """The quality gates this stage is held to, each with where its value came from."""
        w8a8 = self.method == "smoothquant"
        return quantize_policy("W8A8" if w8a8 else f"{self.bits}-bit weights", "w8a8" if w8a8 else int(self.bits or 4),
                               self.verify)

    @property
    def exportable(self) -> bool:
        return self.quant_method.exportable

    @property
    def weight_only(self) -> bool:
        """Integers the precision stage can lower (qweight, scales, zeros per layer)."""
        return self.quant_method.weight_only


class QuantizeStage(Stage):
    name = "quantize"
    Config: ClassVar[type] = QuantizeConfig
    version = 5
    memory_factor = 4.0
    changes_reference = True
    disk_factor = 1.0  # the quantized checkpoint, at most the float32 model's size

    def memory_multiple(self) -> float:
        """RTN: the model, its quantized twin and the evaluation (1.89 measured on 0.85 B); the calibrating
        methods' libraries hold more and have not been measured at size (4x assumed)."""
        return 2.0 if self.spec.method == "rtn" else self.memory_factor

    @property
    def tools(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("torch", "transformers", "safetensors") + self.spec.quant_method.tools

    def thresholds(self) -> Policy:
        return self.spec.gates()

    def verification_key(self) -> dict[str, Any]:
        # what decides this stage's verdict: its own gates and the held-out text they are measured on
        v = self.ctx.verify_spec
        return {"gates": self.thresholds().values(),
                "eval": {"text": v.eval_text, "windows": v.eval_windows, "window_tokens": v.eval_window_tokens}}

    # -- build ---------------------------------------------------------------------------------

    def _windows(self, tokenizer):
        cal = self.spec.calibration
        return calibration_windows(tokenizer, cal.text, cal.samples, cal.seq_len, cal.seed,
                                   self.ctx.recipe.path.parent,
                                   where=f"{self.ctx.recipe.path}: stages.quantize.calibration")

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        spec = self.spec
        method = spec.quant_method
        source = self.ctx.model_path
        info: dict[str, Any] = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
                                "symmetric": spec.symmetric, "exclude": list(spec.exclude)}
        self.ctx.say(f"quantizing: {self._label()}")
        windowed = reset_peak_rss()
        start = time.perf_counter()
        job = QuantJob(source=source, out=out, cfg=spec, trust_remote_code=self.ctx.recipe.recipe.model.trust_remote_code,
                       calibration=self._windows if spec.calibration is not None else None, say=self.ctx.say)
        outcome = method.build(job)
        info.update(outcome.info)
        if not outcome.layers:
            raise StageError(f"no Linear layer of {source} was quantized (all excluded by {list(spec.exclude)})")
        info.update({"layers": outcome.layers, "excluded": outcome.skipped})
        if method.weight_only:
            info["zero_point"] = "unsigned, weight = (qweight - zeros) * scales"
        if method.exportable:
            if outcome.model is None:
                raise StageError(f"method {method.name} returned no model to export")
            with torch.no_grad():
                outcome.model.save_pretrained(out / "model", safe_serialization=True)
            outcome.tokenizer.save_pretrained(out / "model")
            save_file({k: v.contiguous() for k, v in outcome.tensors.items()}, str(out / "qparams.safetensors"))
        seconds = outcome.seconds
        del outcome
        total = time.perf_counter() - start
        generation = source / "generation_config.json"
        for folder in (out / "model", out / "checkpoint"):
            if folder.is_dir() and generation.is_file() and not (folder / generation.name).is_file():
                shutil.copy2(generation, folder / generation.name)
        if (out / "checkpoint").is_dir():
            info["checkpoint_bytes"] = sum(p.stat().st_size for p in (out / "checkpoint").glob("*.safetensors"))
        (out / "quantization.json").write_text(json.dumps(info, indent=2) + "\n")
        peak = peak_rss_bytes()
        model_info = dict(Artifact(parent).model_info) if parent is not None else {}
        shipped = out / "model" if (out / "model").is_dir() else out / "checkpoint"
        model_info["weights_bytes"] = sum(p.stat().st_size for p in shipped.glob("*.safetensors"))
        record = artifact_record("checkpoint", reference_model="model" if method.exportable else None,
                                 qparams="qparams.safetensors" if method.exportable else None)
        return {"artifact": record, "model": model_info, "quantization": info,
                "quantize_seconds": seconds,
                "stage_seconds": total, "peak_rss_bytes": peak,
                "peak_rss_scope": "this stage's build" if windowed else "the process"}

    def _label(self) -> str:
        s = self.spec
        if s.method == "bitsandbytes":
            return f"bitsandbytes {s.bnb_type}"
        if s.method == "smoothquant":
            return "W8A8 without smoothing" if s.alpha is None else f"SmoothQuant W8A8 alpha {s.alpha}"
        group = "per channel" if s.group_size == -1 else f"group {s.group_size}"  # auto: resolved per model
        return f"{s.method.upper()} W{s.bits} {group} {'symmetric' if s.symmetric else 'asymmetric'}"

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
        notes = [f"left unquantized: {', '.join(quant.get('excluded', [])) or 'none'}"]
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
            if not worst <= KERNEL_MAX_REL_DIFF:
                failures.append(f"the extracted integers differ from what the checkpoint's kernels compute with "
                                f"(max relative weight difference {worst:.3g} > {KERNEL_MAX_REL_DIFF:g}): the layout "
                                "was misread")
        gates = self.thresholds()
        if gates.max_kl_mean is not None and not metrics["kl_mean"] <= gates.max_kl_mean:
            failures.append(f"kl_mean {metrics['kl_mean']:.4g} > max_kl_mean {gates.max_kl_mean:g}")
        if gates.min_top1_agreement is not None and not metrics["top1_agreement"] >= gates.min_top1_agreement:
            failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < min_top1_agreement "
                            f"{gates.min_top1_agreement:g}")
        limit = gates.max_perplexity_increase
        if limit is not None and not metrics["perplexity_change"] <= limit:
            failures.append(f"perplexity {metrics['perplexity']:.3f} is {metrics['perplexity_change']:+.1%} from "
                            f"{metrics['perplexity_ref']:.3f} > max_perplexity_increase {limit:g}")
        return Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)

    def _kernel_agreement(self, checkpoint: Path, out: Path, probe_columns: int = 256) -> float:
        """Largest relative difference between the extracted dequantized weights and the effective weights
        of the reloaded checkpoint's own modules, probed with identity inputs on the first input channels."""
        import torch
        from safetensors.torch import load_file

        from ..quant.formats import LayerQuant

        reloaded, _ = self.ctx.model_at(checkpoint)
        params = load_file(str(out / "qparams.safetensors"))
        modules = dict(reloaded.named_modules())
        worst = 0.0

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
