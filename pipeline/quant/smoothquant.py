"""SmoothQuant W8A8 INT8: per-channel INT8 weights, static per-tensor INT8 activations.

Method
------
Activations of LLMs have a few input channels with values far larger than the rest, so one
INT8 scale per tensor wastes most of its range on them; weights are easy to quantize. SmoothQuant
moves part of that difficulty from activations to weights with a per-input-channel factor s:

    Y = X W^T = (X / s) (W * s)^T,    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

max|X_j| is the absolute maximum of input channel j over the calibration windows and max|W_j| the
absolute maximum of weight column j over every Linear that reads that input; alpha (the migration
strength) is in [0, 1]: 0 leaves activations as hard as they were, 1 moves all of it to weights.
Channels that never fire, or whose weight columns are all zero, keep s = 1.

The division by s is folded into the weights of what produces X, and the multiplication into
the Linear weights that read it, so the smoothed model is an exact floating-point model (equal to
the original up to rounding). The producer is a norm (its per-channel weight is divided by s) or,
for the MLP's down projection, up_proj: down_proj reads silu(gate) * up, which is linear in each
output row of up_proj, so dividing those rows (and their bias) by s divides down_proj's input
channels by s exactly. The groups are, per decoder layer of the families in SMOOTHING_GROUPS:

    input_layernorm          -> q_proj, k_proj, v_proj   (phi3: qkv_proj)
    post_attention_layernorm -> gate_proj, up_proj       (phi3: gate_up_proj)
    up_proj                  -> down_proj                (not phi3, whose up rows are fused with gate)

Per-output-channel weight quantization is unchanged by scaling a row, so folding into up_proj's rows
costs its INT8 weights nothing. On the shipped model down_proj's input holds most of the W8A8 error
(about 90% of it), which is why that group matters there. o_proj is quantized W8A8 but not
smoothed. Other families raise ValueError. Without alpha (None) the model is quantized the same way
with no smoothing.

Quantization of the (smoothed) model, every Linear not excluded:

    weights      symmetric per output channel: scale = max|W_o| / 127,
                 q = clamp(round(W / scale), -127, 127) as int8
    activations  static, symmetric per tensor: input_scale = max|X| / 127, the absolute maximum
                 of the Linear's input over the calibration windows (forward pre-hooks); at
                 inference x -> clamp(round(x / input_scale), -128, 127) * input_scale, the range
                 compressed-tensors and vLLM clamp activations to

A zero scale (all-zero weight row, or an input that was zero on every window) becomes 1: the
integers are then all zero and dequantize to exactly zero whatever the scale, and 1 stays
representable when the checkpoint is reloaded in float16 / bfloat16, where a tiny epsilon
could underflow to zero and turn 0 / 0 into NaN.

Checkpoint format
-----------------
A Hugging Face checkpoint in the compressed-tensors `int-quantized` format that vLLM serves and
transformers (with compressed-tensors installed) reloads:

- config.json `quantization_config`: quant_method compressed-tensors, format int-quantized,
  quantization_status compressed, one config group targeting Linear with weights {8 bits, int,
  symmetric, strategy channel, static} and input_activations {8 bits, int, symmetric, strategy
  tensor, static}, `ignore` listing the Linear layers left in floating point (lm_head...).
- safetensors, per quantized Linear: `<name>.weight` int8 [O, I], `<name>.weight_scale` float32
  [O, 1], `<name>.input_scale` float32 [1]; no zero points (symmetric). Norms carry the smoothed
  weights; every other tensor is as in the source model. q/k/v (and gate/up) read one input, so
  their input scales are equal, as the fused layers of vLLM need.

The int8 weights are produced by compressed-tensors' own int-quantized compressor from the scales
computed here, and checked against this module's integers before anything is written.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .rtn import excluded as is_excluded

QMAX = 127  # scales map the absolute maximum to 127; weights use the symmetric range [-127, 127]
ACT_QMIN, ACT_QMAX = -128, 127  # activations: the full int8 range, as compressed-tensors / vLLM clamp them
FORMAT = "int-quantized"
SMOOTH_EPS = 1e-5  # floor of the channel maxima in the smoothing factor

_LLAMA_STYLE = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
_PHI3 = (
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
)
# model_type -> per decoder layer: (producer: a norm or up_proj, Linears that read its output), paths
# relative to the layer
SMOOTHING_GROUPS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "granite": _LLAMA_STYLE,
    "phi3": _PHI3,
}


@dataclass
class W8A8Result:
    tensors: dict[str, torch.Tensor]  # <name>.qweight int8 [O, I], .weight_scale f32 [O, 1], .input_scale f32 [1],
    #                                   and for smoothed layers .smooth f32 [I] (the factor the input was divided by)
    layers: list[dict]  # {"name", "in", "out", "smoothed"}
    excluded: list[str]
    smoothing: list[dict]  # {"norm", "linears", "max_factor", "min_factor"} per smoothing group
    seconds: float


# ---------------------------------------------------------------------------------------------
# smoothing groups


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def smoothing_groups(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(norm name, names of the Linears it feeds) for every decoder layer, in model order."""
    model_type = getattr(model.config, "model_type", None)
    layout = SMOOTHING_GROUPS.get(model_type)
    if layout is None:
        raise ValueError(
            f"smoothquant does not support model_type {model_type!r}: it needs a norm whose output feeds "
            f"the Linear layers directly, to fold the smoothing factors into; supported model types: "
            f"{', '.join(sorted(SMOOTHING_GROUPS))}"
        )
    groups: list[tuple[str, list[str]]] = []
    for prefix, layer in model.named_modules():
        for norm_path, linear_paths in layout:
            norm = _submodule(layer, norm_path)
            linears = [_submodule(layer, p) for p in linear_paths]
            if norm is None or any(lin is None for lin in linears):
                continue
            norm_name = f"{prefix}.{norm_path}" if prefix else norm_path
            _check_group(norm_name, norm, linears)
            groups.append((norm_name, [f"{prefix}.{p}" if prefix else p for p in linear_paths]))
    if not groups:
        raise ValueError(f"smoothquant: found no decoder layer of model_type {model_type!r} with "
                         f"{' / '.join(norm for norm, _ in layout)} feeding {', '.join(layout[0][1])}")
    return groups


def _check_group(norm_name: str, norm: torch.nn.Module, linears: list[torch.nn.Module]) -> None:
    weight = getattr(norm, "weight", None)
    if isinstance(norm, torch.nn.Linear):
        width = norm.out_features
    elif isinstance(weight, torch.Tensor) and weight.ndim == 1:
        width = weight.shape[0]
    else:
        raise ValueError(f"smoothquant: {norm_name} has no per-channel weight to fold the smoothing factors into")
    for linear in linears:
        if not isinstance(linear, torch.nn.Linear) or linear.in_features != width:
            raise ValueError(f"smoothquant: {norm_name} ({width} channels) does not feed a Linear "
                             f"of the same width")


# ---------------------------------------------------------------------------------------------
# calibration


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_windows(model: torch.nn.Module, windows: np.ndarray, batch_size: int, observed: Sequence[str]) -> None:
    """Forward every window, in batches; the full logits only when the output layer is observed."""
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration windows must be a non-empty [samples, seq_len] array, got {windows.shape}")
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    needs_logits = output_layer is None or any(model.get_submodule(n) is output_layer for n in observed)
    extra = {}
    if not needs_logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # [batch, seq, vocab] logits can be larger than the whole model
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                ids = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size], dtype=np.int64))
                ids = ids.to(device)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
    finally:
        model.train(was_training)


def input_channel_absmax(model: torch.nn.Module, names: Sequence[str], windows: np.ndarray,
                         batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Absolute maximum of each input channel of each named Linear over all windows (float32 [I])."""
    stats: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(observer(name)) for name in names]
    try:
        _run_windows(model, windows, batch_size, names)
    finally:
        for handle in handles:
            handle.remove()
    bad = [name for name, amax in stats.items() if not torch.isfinite(amax).all()]
    if bad:
        raise ValueError(f"non-finite activations at the input of {', '.join(bad)} during calibration")
    return stats


# ---------------------------------------------------------------------------------------------
# smoothing


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel is dead (zero input or zero weights)."""
    act = act_absmax.double()
    wgt = weight_absmax.double()
    s = act.clamp(min=SMOOTH_EPS).pow(alpha) / wgt.clamp(min=SMOOTH_EPS).pow(1.0 - alpha)
    live = (act > 0) & (wgt > 0)
    return torch.where(live, s, torch.ones_like(s)).float()


@torch.no_grad()
def _fold(norm: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """The producer's channel j divided by s_j (a norm's weight and bias; a Linear's output row j and
    bias); every reading Linear's column j *= s_j."""
    rows = isinstance(norm, torch.nn.Linear)
    for param in (norm.weight, getattr(norm, "bias", None)):
        if isinstance(param, torch.Tensor):
            factor = s.to(param.device)[:, None] if rows and param.ndim == 2 else s.to(param.device)
            param.copy_((param.float() / factor).to(param.dtype))
    for linear in linears:
        w = linear.weight
        w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))


def _smooth(model: torch.nn.Module, windows: np.ndarray, alpha: float,
            batch_size: int) -> list[tuple[dict, torch.Tensor]]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha (migration strength) must be in [0, 1], got {alpha}")
    groups = smoothing_groups(model)
    act = input_channel_absmax(model, [n for _, names in groups for n in names], windows, batch_size)
    done = []
    for norm_name, names in groups:
        linears = [model.get_submodule(n) for n in names]
        act_max = torch.stack([act[n] for n in names]).amax(dim=0)  # the group's Linears read one input
        weight_max = torch.cat([lin.weight.detach().float() for lin in linears]).abs().amax(dim=0).cpu()
        s = smoothing_factors(act_max.cpu(), weight_max, alpha)
        _fold(model.get_submodule(norm_name), linears, s)
        record = {"norm": norm_name, "linears": list(names),
                  "max_factor": float(s.max()), "min_factor": float(s.min())}
        done.append((record, s))
    return done


def smooth(model: torch.nn.Module, windows: np.ndarray, alpha: float, batch_size: int = 8) -> list[dict]:
    """In place: fold SmoothQuant factors into each group's norm and Linears; the model stays exact FP."""
    return [record for record, _ in _smooth(model, windows, alpha, batch_size)]


# ---------------------------------------------------------------------------------------------
# quantization


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (int8 [O, I], float32 scale [O, 1])."""
    w = weight.detach().float()
    scale = _nonzero(w.abs().amax(dim=1, keepdim=True) / QMAX)
    q = torch.clamp(torch.round(w / scale), -QMAX, QMAX).to(torch.int8)
    return q.cpu().contiguous(), scale.cpu().contiguous()


def activation_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Static per-tensor scale, float32 [1], from the absolute maximum of an input."""
    return _nonzero(absmax.float().amax().reshape(1) / QMAX).cpu()


def _refuse_tied(model: torch.nn.Module, chosen: list[tuple[str, torch.nn.Module]]) -> None:
    """A Linear whose weight is also the input embedding cannot be stored as int8."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = getattr(embeddings, "weight", None)
    for name, module in chosen:
        if shared is not None and module.weight is shared:
            raise ValueError(f"W8A8: {name} shares its weight with the input embeddings (tied); exclude it")


def quantize_w8a8(model: torch.nn.Module, windows: np.ndarray, exclude: tuple[str, ...], alpha: float | None,
                  batch_size: int = 8) -> W8A8Result:
    """SmoothQuant (alpha) or plain (alpha None) W8A8 of every Linear not excluded.

    `model` is left holding the smoothed floating-point weights (not fake-quantized); the integers,
    scales and smoothing factors are in the result.
    """
    t0 = time.perf_counter()
    if alpha is not None:
        smoothing_groups(model)  # an unsupported family is refused before any work
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [(name, m) for name, m in linears if not is_excluded(name, exclude)]
    excluded = [name for name, m in linears if is_excluded(name, exclude)]
    if not chosen:
        raise ValueError(f"W8A8: no Linear layer left to quantize (all excluded by {list(exclude)})")
    _refuse_tied(model, chosen)

    smoothing: list[dict] = []
    factors: dict[str, torch.Tensor] = {}
    if alpha is not None:
        for record, s in _smooth(model, windows, alpha, batch_size):
            smoothing.append(record)
            factors.update({name: s for name in record["linears"]})

    act = input_channel_absmax(model, [name for name, _ in chosen], windows, batch_size)
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict] = []
    for name, module in chosen:
        if name not in act:
            raise ValueError(f"W8A8: {name} was never called on the calibration windows")
        q, scale = quantize_weight(module.weight)
        tensors[f"{name}.qweight"] = q
        tensors[f"{name}.weight_scale"] = scale
        tensors[f"{name}.input_scale"] = activation_scale(act[name])
        if name in factors:
            tensors[f"{name}.smooth"] = factors[name].clone()
        layers.append({"name": name, "in": module.in_features, "out": module.out_features,
                       "smoothed": name in factors})
    return W8A8Result(tensors, layers, excluded, smoothing, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# in-memory evaluation


def quantize_dequantize_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor INT8 round trip, in the order compressed-tensors evaluates it."""
    scale = input_scale.to(x.device)
    q = torch.round(torch.clamp(x / scale, ACT_QMIN, ACT_QMAX)).to(x.dtype)
    return q.to(scale.dtype) * scale


def dequantize_weight(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return qweight.to(weight_scale.dtype) * weight_scale


@contextlib.contextmanager
def fake_quant_w8a8(model: torch.nn.Module, result: W8A8Result) -> Iterator[torch.nn.Module]:
    """Within the block, `model` computes the W8A8 model in floating point: each quantized Linear uses
    qweight * weight_scale and sees its input quantize-dequantized with input_scale. Restored on exit."""
    saved: dict[str, torch.Tensor] = {}
    handles = []

    def activation_hook(input_scale: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            return (quantize_dequantize_activation(args[0], input_scale), *args[1:])
        return hook

    try:
        for layer in result.layers:
            name = layer["name"]
            module = model.get_submodule(name)
            deq = dequantize_weight(result.tensors[f"{name}.qweight"], result.tensors[f"{name}.weight_scale"])
            saved[name] = module.weight.data
            module.weight.data = deq.to(device=saved[name].device, dtype=saved[name].dtype)
            handles.append(module.register_forward_pre_hook(activation_hook(result.tensors[f"{name}.input_scale"])))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for name, data in saved.items():
            model.get_submodule(name).weight.data = data


# ---------------------------------------------------------------------------------------------
# checkpoint


def quantization_config(excluded: Sequence[str]):
    """The compressed-tensors configuration of the checkpoint (status: compressed)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def int8(strategy: str) -> QuantizationArgs:
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=False)

    scheme = QuantizationScheme(targets=["Linear"], weights=int8("channel"), input_activations=int8("tensor"),
                                format=FORMAT)
    return QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, ignore=list(excluded),
                              quantization_status="compressed")


def _check_targets(model: torch.nn.Module, config, result: W8A8Result) -> None:
    """compressed-tensors must select exactly the layers quantized here when it reloads the checkpoint."""
    from compressed_tensors.utils import match_named_modules

    targets = [t for group in config.config_groups.values() for t in group.targets]
    selected = {name for name, _ in match_named_modules(model, targets, config.ignore)}
    ours = {layer["name"] for layer in result.layers}
    if selected != ours:
        raise ValueError(f"W8A8 checkpoint: the config would select {sorted(selected ^ ours)} differently "
                         f"from the quantized layers")


def compressed_state_dict(model: torch.nn.Module, result: W8A8Result, config) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized Linear's weight replaced by int8 + scales."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    scheme = config.config_groups["group_0"]
    state = dict(model.state_dict())
    for layer in result.layers:
        name = layer["name"]
        weight_scale = result.tensors[f"{name}.weight_scale"]
        weight = model.get_submodule(name).weight.detach().float().cpu()
        packed = compressor.compress({"weight": weight, "weight_scale": weight_scale}, scheme)
        if not torch.equal(packed["weight"], result.tensors[f"{name}.qweight"]):
            raise ValueError(f"W8A8 checkpoint: {name}: the model's weight does not quantize to the computed "
                             f"integers (was the model changed after quantize_w8a8?)")
        state[f"{name}.weight"] = packed["weight"]
        state[f"{name}.weight_scale"] = weight_scale
        state[f"{name}.input_scale"] = result.tensors[f"{name}.input_scale"]
    return state


def save_w8a8_checkpoint(model: torch.nn.Module, tokenizer, result: W8A8Result, out_dir: Path) -> None:
    """Write a compressed-tensors int-quantized checkpoint of the (smoothed) model, and the tokenizer."""
    from compressed_tensors.compressors import ModelCompressor

    out_dir = Path(out_dir)
    config = quantization_config(result.excluded)
    _check_targets(model, config, result)
    state = compressed_state_dict(model, result, config)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    ModelCompressor(quantization_config=config).update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)


def build(job):
    """The quantize stage's SmoothQuant W8A8 method (pipeline/quant/methods.py)."""
    from .methods import QuantOutcome

    cfg = job.cfg
    info: dict = {}
    model, tokenizer = job.load()
    windows = job.windows(tokenizer, info)
    result = quantize_w8a8(model, windows, cfg.exclude, cfg.alpha)
    info["smoothing"] = result.smoothing
    save_w8a8_checkpoint(model, tokenizer, result, job.out / "checkpoint")
    return QuantOutcome(result.seconds, result.layers, result.excluded, model, tokenizer, result.tensors, info)
