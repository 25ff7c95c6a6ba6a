"""Weight-only int8 linears (`model.weight_bits: 8`): symmetric per-output-channel quantization.

A weight row w (in,) is held as q = round(w / s) in [-127, 127] with one scale s per row, stored in
bf16 (the dtype torch's CPU int8 kernel takes, so the kernel and `dequantize` use the same value):
s = bf16(max|w| / 127), within a relative 2^-8 (bf16's unit roundoff) of the exact ratio, so
max|w| / s <= 127.5 and every element rounds into range with |w - q*s| <= s/2 (the clamp takes the one
tie, 127.5, that round-half-even would send to 128). The product with activations is `kernels.linear`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

QMAX = 127  # symmetric: -128 is never produced


class Int8Weight(NamedTuple):
    """A linear weight (out, in) as int8 `q` (out, in) times a bf16 `scale` (out,) per output row, or
    times an fp32 `scale` (out, in / GROUP) per GROUP weights of a row (GGUF Q8_0 read as stored:
    `runner.model.gguf`; an fp16 scale widened exactly)."""
    q: Tensor
    scale: Tensor

    def nbytes(self) -> int:
        """Bytes held: the int8 values and the scales."""
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


GROUP = 32  # weights per scale of a group-wise Int8Weight (Q8_0's block)


def quantize(w: Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float matrix (out, in), computed in fp32. An all-zero
    row gets scale 1 (its q is zero either way), so the division never makes NaNs."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(torch.bfloat16)
    q = torch.round(w32 / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.contiguous())


def dequantize(w: Int8Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float matrix (out, in) the weight stands for: q * scale, exact in fp32, then cast to `dtype`."""
    if w.scale.dim() == 2:  # group-wise: (out, in / GROUP)
        out, cols = w.q.shape
        return (w.q.float().view(out, -1, GROUP) * w.scale.float()[..., None]).view(out, cols).to(dtype)
    if dtype == torch.bfloat16 and w.scale.dtype == torch.bfloat16:
        # bf16(q) is exact (|q| <= 127) and torch's bf16 product is the fp32 one rounded once: the bits of
        # the line below in two passes over the weight, not four, and no fp32 copy (int8 prefill's cost).
        return w.q.to(torch.bfloat16).mul_(w.scale[:, None])
    return (w.q.float() * w.scale.float()[:, None]).to(dtype)


def cat(parts: list[Int8Weight]) -> Int8Weight:
    """Parts stacked along the output rows (a fused qkv or gate_up), all of one kind of scale."""
    return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

