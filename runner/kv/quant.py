"""Group-wise asymmetric min/max KV quantization (FlexGen / ALISA style) and a quantized cache.

A group is `group_size` consecutive elements along one dimension. Each group keeps its min
and its step `scale = (max - min) / (2**bits - 1)` in the compute dtype and stores codes
`round((x - min) / scale)` as uint8 (int8) or two codes per byte (int4), so the error of
every element is at most scale / 2.

`QuantizedKVCache` has the methods of `runner.kv.cache.KVCache` over that storage:

* axis "hidden" (FlexGen): groups run along the head dim of one token and head, so a token
  is quantized on its own at write time and gather / compact are plain row gathers.
* axis "channel" (ALISA): each channel is quantized over `group_size` consecutive slots.
  The slots of an incomplete trailing group wait in a full-precision residual (as in
  KIVI) and are quantized when the group fills.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from runner.model.config import ModelConfig
from runner.kv.cache import Scratch, take_slots
from runner.kv.protocol import KVCacheBase

AXES = ("hidden", "channel")
UNQUANTIZED_BITS = 16  # kv.bits / a layout's bits for values kept in the compute dtype
FLEXGEN_BITS, FLEXGEN_GROUP = 4, 64  # FlexGen's CompressionConfig (compress_weight, compress_cache)


@dataclass(frozen=True, kw_only=True)
class QuantLayout:
    """How a tensor is stored by `quantize`: codes packed `8 // bits` per byte along `dim`, and one
    scale and one minimum (compute dtype) per `group_size` elements along `dim`. The one statement
    of that storage's shapes and bytes: caches allocate with `parts`, planners size with `nbytes`
    and the cost model with `element_bytes`. bits == UNQUANTIZED_BITS: the values as they are."""
    bits: int
    group_size: int
    dim: int

    @property
    def quantized(self) -> bool:
        return self.bits != UNQUANTIZED_BITS

    def parts(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each stored tensor of a `shape` value: [data, scale, mn] (or [values])."""
        shape = tuple(shape)
        if not self.quantized:
            return [(shape, dtype)]
        dim = self.dim % len(shape)
        n = shape[dim]
        data = (*shape[:dim], n * self.bits // 8, *shape[dim + 1:])
        groups = (*shape[:dim], n // self.group_size, *shape[dim + 1:])
        return [(data, torch.uint8), (groups, dtype), (groups, dtype)]

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Stored bytes of a `shape` value."""
        return sum(math.prod(s) * t.itemsize for s, t in self.parts(shape, dtype))

    def element_bytes(self, itemsize: int) -> float:
        """Mean stored bytes per element (codes plus a group's scale and minimum shared out)."""
        return itemsize if not self.quantized else self.bits / 8 + 2 * itemsize / self.group_size


def flexgen_cache_layout(head_dim: int, dim: int = -1) -> QuantLayout:
    """FlexGen's compress_cache: 4-bit groups of 64 along the head dim (the head dim, when smaller)."""
    return QuantLayout(bits=FLEXGEN_BITS, group_size=min(FLEXGEN_GROUP, head_dim), dim=dim)


@dataclass
class QTensor:
    """Quantized tensor: codes in `data`, per-group `scale` and `mn` with `dim` cut into groups."""
    data: Tensor  # uint8; shape with shape[dim] halved for int4
    scale: Tensor  # shape with shape[dim] // group_size, compute dtype
    mn: Tensor
    bits: int
    group_size: int
    dim: int
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.mn))


def check_params(bits: int, group_size: int, length: int | None = None) -> None:
    """Raise ValueError (naming the config key) for unsupported bits or group sizes."""
    if bits not in (4, 8):
        raise ValueError(f"kv.bits: {bits} not supported; use 4 or 8")
    if group_size <= 0:
        raise ValueError(f"kv.group_size: must be positive, got {group_size}")
    if bits == 4 and group_size % 2:
        # Two int4 codes share a byte; an odd group would split a byte between two groups.
        raise ValueError(f"kv.group_size: int4 packs two codes per byte, so it must be even, got {group_size}")
    if length is not None and length % group_size:
        raise ValueError(f"kv.group_size: {group_size} does not divide the quantized dimension length {length}")


def quantize(x: Tensor, bits: int, group_size: int, dim: int) -> QTensor:
    """Quantize groups of `group_size` consecutive elements along `dim`; scale/mn keep x.dtype."""
    dim = dim % x.dim()
    n = x.shape[dim]
    check_params(bits, group_size, n)
    pre, post = x.shape[:dim], x.shape[dim + 1:]
    levels = 2 ** bits - 1
    # fp32 arithmetic so fp16 inputs do not lose code precision; only scale/mn are stored narrow.
    xg = x.float().reshape(*pre, n // group_size, group_size, *post)  # group axis at dim + 1
    mn, mx = torch.aminmax(xg, dim=dim + 1)  # (*pre, n / g, *post)
    # A zero step (constant group) would divide by zero; the smallest normal step keeps every
    # code 0 so constant groups round-trip exactly, and bounds the error of underflowed steps.
    scale = ((mx - mn) / levels).to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
    mn = mn.to(x.dtype)
    # Codes from the stored (rounded) scale and min, so the error bound holds for what dequantize sees.
    codes = ((xg - mn.float().unsqueeze(dim + 1)) / scale.float().unsqueeze(dim + 1))
    codes = codes.round_().clamp_(0, levels).to(torch.uint8).reshape(x.shape)
    return QTensor(_pack(codes, bits, dim), scale, mn, bits, group_size, dim, x.shape)


def dequantize(q: QTensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """codes * scale + mn, shape q.shape, in `dtype` (into `out` of that shape if given)."""
    dim, g = q.dim, q.group_size
    pre, n, post = q.shape[:dim], q.shape[dim], q.shape[dim + 1:]
    grouped = (*pre, n // g, g, *post)
    codes = _unpack(q.data, q.bits, dim).reshape(grouped)
    res = _affine(codes, q.scale.unsqueeze(dim + 1), q.mn.unsqueeze(dim + 1), dtype,
                  None if out is None else out.view(grouped))
    return res.reshape(q.shape) if out is None else out


def _affine(codes: Tensor, scale: Tensor, mn: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """mn + codes * scale in `dtype`; scale/mn broadcast. Integer codes go straight into the
    multiply (no float copy of them), and `out` lets decode reuse one buffer per step."""
    work = torch.promote_types(scale.dtype, dtype)
    if work in (torch.bfloat16, torch.float16):
        # Half precision rounds code * scale and then + mn: two roundings can break the
        # scale / 2 error bound (bf16's 8 mantissa bits cannot even hold code * scale).
        work = torch.float32
    if work != dtype or out is None:
        res = torch.mul(codes, scale.to(work)).add_(mn.to(work)).to(dtype)
        return res if out is None else out.copy_(res)
    # mul then add: 2.5x faster than addcmul with these broadcast shapes on this CPU.
    return torch.mul(codes, scale, out=out).add_(mn)


def _pack(codes: Tensor, bits: int, dim: int) -> Tensor:
    """int4: codes 2i and 2i+1 along dim -> low and high nibble of byte i."""
    if bits == 8:
        return codes
    pairs = codes.reshape(*codes.shape[:dim], codes.shape[dim] // 2, 2, *codes.shape[dim + 1:])
    return pairs.select(dim + 1, 0) | (pairs.select(dim + 1, 1) << 4)


def _unpack(data: Tensor, bits: int, dim: int) -> Tensor:
    if bits == 8:
        return data
    pairs = torch.stack((data & 0xF, data >> 4), dim=dim + 1)
    return pairs.reshape(*data.shape[:dim], data.shape[dim] * 2, *data.shape[dim + 1:])


def _slots(index: Tensor) -> Tensor:
    """Index broadcastable against gathered (b, kvh, m, d) values."""
    return index.view(1, 1, -1, 1) if index.dim() == 1 else index.unsqueeze(-1)  # (b|1, g|1, m, 1)


Store = list[Tensor]  # one layer's K or V: [data, scale, mn] (+ [residual] for axis "channel")


class QuantizedKVCache(KVCacheBase):
    """KVCache with integer storage; see the module docstring for the two axes."""

    groupable = True

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, *, bits: int = 8, group_size: int = 64,
                 axis: str = "hidden"):
        if axis not in AXES:
            raise ValueError(f"kv.quant_axis: {axis!r} not supported; use one of {AXES}")
        d, kvh = cfg.head_dim, cfg.num_kv_heads
        check_params(bits, group_size, d if axis == "hidden" else None)
        self.max_len, self.dtype = max_len, dtype
        self.bits, self.group_size, self.axis = bits, group_size, axis
        self.layout = QuantLayout(bits=bits, group_size=group_size, dim=3 if axis == "hidden" else 2)
        self.k = [self._alloc(batch, kvh, d, device) for _ in range(cfg.num_layers)]
        self.v = [self._alloc(batch, kvh, d, device) for _ in range(cfg.num_layers)]
        # Axis "channel": slots written per layer. A list shared with rows() views, so every
        # row group of a prefill sees (and leaves) the same count.
        self._written = [0] * cfg.num_layers
        self.scratch = Scratch()  # dequantized reads and gathers (axis "hidden")

    def _alloc(self, b: int, kvh: int, d: int, device: torch.device | str) -> Store:
        g = self.group_size
        if self.axis == "hidden":
            parts = self.layout.parts((b, kvh, self.max_len, d), self.dtype)
        else:
            qcap = self.max_len // g * g  # a trailing partial group never leaves the residual
            parts = self.layout.parts((b, kvh, qcap, d), self.dtype) + [((b, kvh, g, d), self.dtype)]
        return [torch.zeros(s, dtype=t, device=device) for s, t in parts]

    # -- KVCache interface -------------------------------------------------------------

    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """k, v: (b, kvh, s, d) for slots start..start+s."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        if self.axis == "hidden":
            for store, x in ((self.k[layer], k), (self.v[layer], v)):
                q = quantize(x.to(self.dtype), self.bits, self.group_size, dim=3)
                for dst, src in zip(store, (q.data, q.scale, q.mn)):
                    dst[:, :, start:end] = src
            return
        written = self._written[layer]
        if start > written:
            raise ValueError(f"kv.quant_axis: channel needs contiguous writes; slot {start} "
                             f"written but only {written} slots are filled")
        for store, x in ((self.k[layer], k), (self.v[layer], v)):
            self._write_channel(store, x.to(self.dtype), start, written)
        self._written[layer] = end  # slots after `end` are dropped: the cache only appends

    def read(self, layer: int, end: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """Dequantized slots start..end: (b, kvh, end - start, d) in the compute dtype."""
        if self.axis == "hidden":
            return (self._read_hidden(self.k[layer], end, start, "read k"),
                    self._read_hidden(self.v[layer], end, start, "read v"))
        self._check_read(layer, end)
        written = self._written[layer]
        k, v = self._read_channel(self.k[layer], end, written), self._read_channel(self.v[layer], end, written)
        return k[:, :, start:], v[:, :, start:]

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """Dequantized copies of the selected slots: (b, kvh, m, d). See `flat_rows` for index."""
        if self.axis == "hidden":
            return (self._gather_hidden(self.k[layer], index, "gather k"),
                    self._gather_hidden(self.v[layer], index, "gather v"))
        written = self._written[layer]
        return (self._gather_channel(self.k[layer], index, written),
                self._gather_channel(self.v[layer], index, written))

    def take_rows(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Dequantized slots by flat row number into (b * kvh * max_len, ...): (r, d) each."""
        if self.axis != "hidden":
            raise ValueError("take_rows needs kv.quant_axis: hidden (channel groups span slots)")
        return self._rows_hidden(self.k[layer], rows), self._rows_hidden(self.v[layer], rows)

    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only the selected slots: afterwards slots 0..m-1 hold them, in index order."""
        if self.axis == "channel":
            # Slots of one channel group share a scale; moving single slots would need a requantize.
            raise ValueError("kv.quant_axis: channel cannot be combined with kv.mode: evict "
                             "(channel groups span slots, so slots cannot be compacted); use kv.quant_axis: hidden")
        for store in (self.k[layer], self.v[layer]):
            for t in store:
                kept = take_slots(t, index)
                t[:, :, :kept.shape[2]] = kept

    def rows(self, rows: slice) -> "QuantizedKVCache":
        """A view of some batch rows sharing this cache's storage (writes land here)."""
        view = QuantizedKVCache.__new__(QuantizedKVCache)
        view.__dict__.update(self.__dict__)  # scalars, and the shared `_written` list
        view.scratch = Scratch()
        view.k = [[t[rows] for t in store] for store in self.k]
        view.v = [[t[rows] for t in store] for store in self.v]
        return view

    def select_rows(self, index: Tensor) -> "QuantizedKVCache":
        """A new cache holding rows `index` (b',) of this one, copied (rows may repeat: forking)."""
        out = QuantizedKVCache.__new__(QuantizedKVCache)
        out.__dict__.update(self.__dict__)
        out._written = list(self._written)
        out.scratch = Scratch()
        out.k = [[t[index] for t in store] for store in self.k]
        out.v = [[t[index] for t in store] for store in self.v]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self.k + self.v for t in store)

    def bytes_per_token(self) -> int:
        """Stored bytes of one token's K and V over all layers (per sequence)."""
        return self.nbytes // (self.k[0][0].shape[0] * self.max_len)

    # -- axis "hidden" -----------------------------------------------------------------

    def _read_hidden(self, store: Store, end: int, start: int, key: str) -> Tensor:
        data, scale, mn = (t[:, :, start:end] for t in store)
        return self._dequant_hidden(data, scale, mn, key)

    def _gather_hidden(self, store: Store, index: Tensor, key: str) -> Tensor:
        # Gather int rows with their scale/min rows; only the selection is dequantized.
        data, scale, mn = (take_slots(t, index) for t in store)
        return self._dequant_hidden(data, scale, mn, key)

    def _rows_hidden(self, store: Store, rows: Tensor) -> Tensor:
        data, scale, mn = (t.reshape(-1, t.shape[-1]).index_select(0, rows) for t in store)
        shape = torch.Size((rows.shape[0], scale.shape[1] * self.group_size))  # (r, d)
        return dequantize(QTensor(data, scale, mn, self.bits, self.group_size, 1, shape), self.dtype)

    def _dequant_hidden(self, data: Tensor, scale: Tensor, mn: Tensor, key: str) -> Tensor:
        """Into a scratch buffer reused by the next read (or gather) of any layer."""
        shape = torch.Size((*data.shape[:3], scale.shape[3] * self.group_size))  # (b, kvh, m, d)
        out = self.scratch.take(key, tuple(shape), self.dtype, data.device)
        return dequantize(QTensor(data, scale, mn, self.bits, self.group_size, 3, shape), self.dtype, out)

    # -- axis "channel" ----------------------------------------------------------------

    def _write_channel(self, store: Store, x: Tensor, start: int, written: int) -> None:
        data, scale, mn, res = store
        g, per_byte, end = self.group_size, 8 // self.bits, start + x.shape[2]
        first = start // g * g  # the group holding `start` is re-formed from its earlier slots
        if first < start:
            x = torch.cat((self._dense_prefix(store, first, start, written), x), dim=2)  # (b, kvh, end - first, d)
        full = end // g * g
        if full > first:
            q = quantize(x[:, :, :full - first], self.bits, g, dim=2)
            data[:, :, first // per_byte:full // per_byte] = q.data
            scale[:, :, first // g:full // g] = q.scale
            mn[:, :, first // g:full // g] = q.mn
        res[:, :, :end - full] = x[:, :, full - first:]

    def _dense_prefix(self, store: Store, first: int, start: int, written: int) -> Tensor:
        """Slots first..start of a group-aligned `first`, from the residual or the codes."""
        data, scale, mn, res = store
        if first == written // self.group_size * self.group_size:
            return res[:, :, :start - first]
        # Overwriting inside an already quantized group: its earlier slots are re-quantized.
        return self._dequant_groups(store, first // self.group_size, 1)[:, :, :start - first]

    def _dequant_groups(self, store: Store, group: int, count: int) -> Tensor:
        data, scale, mn = store[:3]
        g, per_byte = self.group_size, 8 // self.bits
        rows = slice(group * g // per_byte, (group + count) * g // per_byte)
        groups = slice(group, group + count)
        shape = torch.Size((*data.shape[:2], count * g, data.shape[3]))  # (b, kvh, count * g, d)
        q = QTensor(data[:, :, rows], scale[:, :, groups], mn[:, :, groups], self.bits, g, 2, shape)
        return dequantize(q, self.dtype)

    def _check_read(self, layer: int, end: int) -> None:
        if end > self._written[layer]:
            raise IndexError(f"KV cache read of {end} slots but only {self._written[layer]} are written")

    def _read_channel(self, store: Store, end: int, written: int) -> Tensor:
        g = self.group_size
        full = written // g * g
        n_quant = min(end, full)
        parts = []
        if n_quant:
            parts.append(self._dequant_groups(store, 0, -(-n_quant // g))[:, :, :n_quant])
        if end > full:
            parts.append(store[3][:, :, :end - full])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (b, kvh, end, d)

    def _gather_channel(self, store: Store, index: Tensor, written: int) -> Tensor:
        data, scale, mn, res = store
        g, full = self.group_size, written // self.group_size * self.group_size
        out = None
        if full:
            idx = index.clamp(max=full - 1)  # residual slots read a valid row, then get replaced
            if self.bits == 8:
                codes = take_slots(data, idx)
            else:  # slot j is nibble j % 2 of packed row j // 2
                shift = (_slots(idx) % 2 * 4).to(torch.uint8)
                codes = (take_slots(data, idx // 2) >> shift) & 0xF
            out = _affine(codes, take_slots(scale, idx // g), take_slots(mn, idx // g), self.dtype)  # (b, kvh, m, d)
        if written > full:
            tail = take_slots(res, (index - full).clamp(0, g - 1))  # (b, kvh, m, d)
            out = tail if out is None else torch.where(_slots(index) >= full, tail, out)
        if out is None:
            raise IndexError("KV cache gather before any slot was written")
        return out
