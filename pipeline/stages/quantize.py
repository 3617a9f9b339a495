"""quantize: weight quantization of the PyTorch model, before export.

Today one method: round-to-nearest (RTN), INT8 per channel or INT4 per group, symmetric or
asymmetric; the reference every other method is to be measured against. The stage writes

    model/                 a Hugging Face checkpoint whose Linear weights are the dequantized
                           values (q - zero) * scale: exactly the quantized model, in FP32, loadable
                           by any transformers
    qparams.safetensors    per layer: `<name>.qweight` (uint8, [out, in]), `<name>.scales`
                           (float32, [out, in / group]), `<name>.zeros` (uint8, same shape): the
                           integers a later lowering into ONNX must reproduce
    quantization.json      method, bits, group size, symmetry, the layers and the layers left out

and is verified on the checkpoint as reloaded from disk, against the original model on held-out
text: perplexity and its relative change, mean KL of next-token distributions, top-1 agreement.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from ..cache import Entry
from ..errors import StageError
from .base import Stage, Verification

COMMON_GROUPS = (256, 128, 64, 32, 16)


def rtn(weight, bits: int, group: int, symmetric: bool):
    """Round-to-nearest. Returns unsigned q [O, I], scales [O, I/g], unsigned zeros [O, I/g], dequantized."""
    import torch

    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(-1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, half)
    else:
        lo = torch.minimum(w.amin(-1), torch.zeros(()))
        hi = torch.maximum(w.amax(-1), torch.zeros(()))
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, qmax)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)
    return q.reshape(out_f, in_f).to(torch.uint8), scale.float(), zero.to(torch.uint8), deq


def group_for(name: str, in_features: int, group_size: int) -> int:
    if group_size == -1:
        return in_features
    if in_features % group_size:
        works = [g for g in COMMON_GROUPS if in_features % g == 0]
        hint = f"group_size {works[0]}" if works else "group_size -1 (per channel)"
        raise StageError(f"layer {name} has {in_features} input channels, not a multiple of group_size "
                         f"{group_size}; use {hint}, or exclude the layer")
    return group_size


class QuantizeStage(Stage):
    name = "quantize"
    version = 1
    tools = ("torch", "transformers", "safetensors")
    memory_factor = 3.0

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        from ..runtime.torch_lm import load_hf_causal_lm

        source = self.ctx.recipe.model_path
        model, tokenizer = load_hf_causal_lm(source, self.ctx.recipe.recipe.model.trust_remote_code)
        spec = self.spec
        self.ctx.say(f"quantizing: RTN W{spec.bits} group {spec.group_size} "
                     f"{'symmetric' if spec.symmetric else 'asymmetric'}")
        t0 = time.perf_counter()
        tensors: dict[str, Any] = {}
        layers, skipped = [], []
        with torch.no_grad():
            for name, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                if any(name == e or name.endswith("." + e) for e in spec.exclude):
                    skipped.append(name)
                    continue
                group = group_for(name, module.in_features, spec.group_size)
                q, scale, zero, deq = rtn(module.weight, spec.bits, group, spec.symmetric)
                module.weight.copy_(deq.to(module.weight.dtype))
                tensors[f"{name}.qweight"] = q.contiguous()
                tensors[f"{name}.scales"] = scale.contiguous()
                tensors[f"{name}.zeros"] = zero.contiguous()
                layers.append({"name": name, "in": module.in_features, "out": module.out_features, "group": group})
        seconds = time.perf_counter() - t0
        if not layers:
            raise StageError(f"no Linear layer of {source} was quantized (all excluded by {list(spec.exclude)})")
        model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        for extra in ("generation_config.json",):
            if (source / extra).is_file() and not (out / "model" / extra).is_file():
                shutil.copy2(source / extra, out / "model" / extra)
        save_file(tensors, str(out / "qparams.safetensors"))
        info = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                "zero_point": "unsigned, (q - zero) * scale", "layers": layers, "excluded": skipped}
        (out / "quantization.json").write_text(json.dumps(info, indent=2) + "\n")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model_info = dict(parent.meta["stage_meta"]["model"])
        model_info["weights_bytes"] = sum(p.stat().st_size for p in (out / "model").glob("*.safetensors"))
        return {"model": model_info, "quantization": info, "quantize_seconds": seconds, "peak_rss_bytes": peak}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        from ..verify.quality import quality_against_original

        self.ctx.say("verifying the reloaded checkpoint against the original")
        metrics = quality_against_original(self.ctx, out / "model")
        metrics["quantize_seconds"] = meta["quantize_seconds"]
        metrics["peak_rss_mb"] = meta["peak_rss_bytes"] / 1e6
        metrics["quantized_layers"] = len(meta["quantization"]["layers"])
        failures = []
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
        notes = [f"gates: {gates}", f"left in FP32: {', '.join(meta['quantization']['excluded']) or 'none'}"]
        return Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)

    def describe(self, entry: Entry) -> str:
        return str(entry.file("model"))
