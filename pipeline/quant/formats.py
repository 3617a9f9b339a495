"""Read a quantized checkpoint's integers back into the project's layout.

Every weight-only method hands the ONNX lowering the same three tensors per Linear layer:

    qweight  uint8 [out, in]         unsigned integers, one per weight
    scales   float32 [out, in/group]
    zeros    uint8 [out, in/group]   unsigned zero points: weight = (qweight - zeros) * scales

Checkpoint layouts read here (all store 32-bit words of 32/bits integers, low bits first):

- GPTQ, GPT-QModel's v1 format: `qweight` int32 [in*bits/32, out] packed along the input
  dimension, `qzeros` int32 [groups, out*bits/32] packed along the output dimension and storing
  zero - 1, `scales` float16 [groups, out], `g_idx` int32 [in] (the group of each input channel).
- AWQ, GEMM format: `qweight` int32 [in, out*bits/32] and `qzeros` int32 [groups, out*bits/32]
  packed along the output dimension, 4-bit words interleaved so that nibble k holds column
  8*w + (0, 2, 4, 6, 1, 3, 5, 7)[k]; zeros stored as they are; `scales` float16 [groups, out].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # position in a word of column 0..7 (inverse of the packing order)


@dataclass
class LayerQuant:
    qweight: Any  # torch uint8 [O, I]
    scales: Any  # torch float32 [O, G]
    zeros: Any  # torch uint8 [O, G]
    group: int

    def dequantize(self):
        import torch

        scales = torch.repeat_interleave(self.scales, self.group, dim=1)
        zeros = torch.repeat_interleave(self.zeros.float(), self.group, dim=1)
        return (self.qweight.float() - zeros) * scales


def unpack_last(words, bits: int):
    """int32 [..., C] -> [..., C * 32/bits]: value i of word c becomes column c * 32/bits + i."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*words.shape[:-1], -1)


def gptq_v1_layer(tensors: dict, prefix: str, bits: int, group: int) -> LayerQuant:
    import torch

    qweight = unpack_last(tensors[f"{prefix}.qweight"].T.contiguous(), bits)  # [O, I]
    zeros = unpack_last(tensors[f"{prefix}.qzeros"], bits).T + 1  # [O, G], v1 stores zero - 1
    if int(zeros.max()) > (1 << bits) - 1:
        raise ValueError(f"{prefix}: a zero point of 0 cannot be stored in the GPTQ v1 layout (it wraps)")
    scales = tensors[f"{prefix}.scales"].float().T.contiguous()  # [O, G]
    in_features = qweight.shape[1]
    g_idx = tensors.get(f"{prefix}.g_idx")
    if group == -1:
        group = in_features
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
        raise ValueError(f"{prefix}: input channels are reordered (act-order / desc_act); the lowering "
                         "needs contiguous groups: quantize with desc_act off")
    return LayerQuant(qweight.to(torch.uint8).contiguous(), scales, zeros.to(torch.uint8).contiguous(), group)


def awq_gemm_layer(tensors: dict, prefix: str, bits: int, group: int) -> LayerQuant:
    import torch

    if bits != 4:
        raise ValueError(f"{prefix}: the AWQ GEMM layout is 4-bit only, got {bits}")
    order = torch.tensor(AWQ_ORDER)

    def columns(words):
        values = unpack_last(words, bits)
        return values.reshape(values.shape[0], -1, 8)[:, :, order].reshape(values.shape[0], -1)

    qweight = columns(tensors[f"{prefix}.qweight"]).T.contiguous()  # [O, I]
    zeros = columns(tensors[f"{prefix}.qzeros"]).T.contiguous()  # [O, G]
    scales = tensors[f"{prefix}.scales"].float().T.contiguous()
    if group == -1:
        group = qweight.shape[1]
    return LayerQuant(qweight.to(torch.uint8), scales, zeros.to(torch.uint8), group)


def read_checkpoint_layers(folder, quant_method: str, bits: int, group: int) -> dict[str, LayerQuant]:
    """Every quantized Linear of a GPTQ (v1) or AWQ (GEMM) checkpoint folder, by module name."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    reader = {"gptq": gptq_v1_layer, "awq": awq_gemm_layer}[quant_method]
    return {p: reader(tensors, p, bits, group) for p in prefixes}
