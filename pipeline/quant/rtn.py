"""Round-to-nearest weight quantization: the reference every other method is measured against."""

from __future__ import annotations

from ..errors import StageError

COMMON_GROUPS = (256, 128, 64, 32, 16)
AUTO_GROUPS = (128, 64, 32, 16)  # what group_size auto tries, largest first (MatMulNBits takes powers of 2 >= 16)


def rtn(weight, bits: int, group: int, symmetric: bool):
    """Returns unsigned q [O, I], scales [O, I/g], unsigned zeros [O, I/g] and the dequantized weight."""
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
    """The group a layer is quantized with; a size that does not divide the layer is an error naming one that does."""
    if group_size == -1:
        return in_features
    if in_features % group_size:
        works = [g for g in COMMON_GROUPS if in_features % g == 0]
        hint = f"group_size {works[0]}" if works else "group_size -1 (per channel)"
        raise StageError(f"layer {name} has {in_features} input channels, not a multiple of group_size "
                         f"{group_size}; use {hint}, or exclude the layer")
    return group_size


def resolve_group(widths: dict[str, int], group_size: int | str, exclude: tuple[str, ...],
                  info: dict | None = None) -> int:
    """The one group size every quantized layer (name -> input channels) is quantized with. `auto` is the
    largest of AUTO_GROUPS dividing every layer; a number is checked against each layer as given."""
    chosen = {n: w for n, w in widths.items() if not excluded(n, exclude)}
    if group_size != "auto":
        for name, width in chosen.items():
            group_for(name, width, int(group_size))
        return int(group_size)
    for group in AUTO_GROUPS:
        if all(w % group == 0 for w in chosen.values()):
            if info is not None:
                odd = sorted({w for w in chosen.values() if w % AUTO_GROUPS[0]})
                info["group_size_auto"] = (f"{group}: the largest of {', '.join(map(str, AUTO_GROUPS))} dividing every "
                                           "quantized layer" + (f" (widths {odd} are not multiples of "
                                                                f"{AUTO_GROUPS[0]})" if odd else ""))
            return group
    widths_seen = sorted(set(chosen.values()))
    raise StageError(f"group_size auto: no group of {', '.join(map(str, AUTO_GROUPS))} divides every quantized layer "
                     f"(input widths {widths_seen}); set group_size -1 (per channel) or exclude the odd layers")


def linear_widths(model) -> dict[str, int]:
    import torch

    return {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in exclude)


def quantize_rtn(model, bits: int, group_size: int, symmetric: bool, exclude: tuple[str, ...]):
    """In place: every Linear not excluded gets its RTN-dequantized weight. Returns (qparams, layers, skipped)."""
    import torch

    tensors, layers, skipped = {}, [], []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if excluded(name, exclude):
                skipped.append(name)
                continue
            group = group_for(name, module.in_features, group_size)
            q, scale, zero, deq = rtn(module.weight, bits, group, symmetric)
            module.weight.copy_(deq.to(module.weight.dtype))
            tensors[f"{name}.qweight"] = q.contiguous()
            tensors[f"{name}.scales"] = scale.contiguous()
            tensors[f"{name}.zeros"] = zero.contiguous()
            layers.append({"name": name, "in": module.in_features, "out": module.out_features, "group": group})
    return tensors, layers, skipped


def build(job):
    """The quantize stage's RTN method (pipeline/quant/methods.py)."""
    import time

    from .methods import QuantOutcome

    cfg = job.cfg
    model, tokenizer = job.load()
    info: dict = {}
    group = resolve_group(linear_widths(model), cfg.group_size, cfg.exclude, info)
    info["group_size"] = group
    t0 = time.perf_counter()
    tensors, layers, skipped = quantize_rtn(model, cfg.bits, group, cfg.symmetric, cfg.exclude)
    return QuantOutcome(time.perf_counter() - t0, layers, skipped, model, tokenizer, tensors, info)
