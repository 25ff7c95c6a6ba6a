"""Canonical weights read one tensor at a time from their source (`LazyWeights`).

Why: a model bigger than RAM can only run if no step of loading holds it whole. `LazyWeights` maps
each canonical name (`runner.model.layers.weight_shapes`) to the parts it is fused from and reads
them when the name is looked up, holding nothing afterwards. The block executor places each tensor
into its home tier and drops it, so a load's peak is one fused tensor above what the tiers hold; the
plain engine calls `materialize()` and holds the whole model, as it must.

Sources of parts: seeded dummy weights (`dummy_parts`: each tensor from its own generator, seeded
by the run's seed and the tensor's name, so the same seed gives the same bytes whichever tensors are
read, in whatever order, into whichever tier), safetensors files (`SafetensorsFile`: the header is
parsed once, each tensor is read (fread) into a fresh buffer, so no mapped file pages count
towards the process's resident memory), and `.bin` shards (`BinShards`: one memory-mapped shard open
at a time). GGUF parts are read from the file's memory map (`runner.model.gguf`).
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from runner.model import int8
from runner.model.int8 import Int8Weight

Part = Callable[[], "Tensor | Int8Weight"]  # reads one stored tensor (any dtype, or int8 as stored) into memory
Shape = tuple[int, ...]


class LazyWeights(Mapping[str, Tensor]):
    """Canonical name -> tensor in `dtype` on `device`, read from its parts at each lookup.

    `parts[name]` are the stored tensors fused (concatenated along dim 0) into `name`; `aliases` maps a
    tied name (an untied checkpoint's `head.lm_w` when embeddings are tied) to the name it reads.
    """

    def __init__(self, parts: dict[str, list[Part]], shapes: dict[str, Shape], *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", aliases: dict[str, str] | None = None):
        self._parts, self._shapes = parts, dict(shapes)
        self._aliases = dict(aliases or {})
        self.dtype, self.device = dtype, torch.device(device)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        pieces = [p() for p in self._parts[self._aliases.get(name, name)]]
        if isinstance(pieces[0], Int8Weight):  # int8 as stored (GGUF Q8_0 with model.weight_bits: 8)
            w = int8.cat(pieces)
            return Int8Weight(w.q.to(self.device), w.scale.to(self.device))
        pieces = [p.to(self.dtype) for p in pieces]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return t.to(self.device)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, name: str) -> Shape:
        return self._shapes[name]

    def nbytes(self) -> int:
        """Bytes of the distinct tensors in `dtype` (a tied name counted once), reading nothing."""
        return sum(math.prod(s) for n, s in self._shapes.items() if n not in self._aliases) * self.dtype.itemsize

    def materialize(self) -> dict[str, Tensor]:
        """Every tensor read once; tied names share one tensor object, as the plain engine expects."""
        out = {n: self[n] for n in self._shapes if n not in self._aliases}
        for name, target in self._aliases.items():
            out[name] = out[target]
        return {n: out[n] for n in self._shapes}

    def clear(self) -> None:
        """Nothing is held between lookups; here so a caller can drop a loaded model's weights either way."""


# ---------------------------------------------------------------- dummy weights

DUMMY_STD = 0.02  # HF's initializer_range: activations stay O(1) through the layers


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor `name`: independent of which other tensors are read, and when."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def dummy_parts(shapes: dict[str, Shape], seed: int, dtype: torch.dtype) -> dict[str, list[Part]]:
    """Norm weights 1, biases 0, matrices N(0, DUMMY_STD), each generated in `dtype` on the CPU."""
    def make(name: str, shape: Shape) -> Part:
        leaf = name.rsplit(".", 1)[1]
        if leaf == "ln_w":
            return lambda: torch.ones(shape, dtype=dtype)
        if leaf.endswith("_b"):
            return lambda: torch.zeros(shape, dtype=dtype)
        return lambda: torch.empty(shape, dtype=dtype).normal_(
            0.0, DUMMY_STD, generator=torch.Generator().manual_seed(tensor_seed(seed, name)))
    return {name: [make(name, shape)] for name, shape in shapes.items()}


# ---------------------------------------------------------------- safetensors, read with pread

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_MAX_HEADER_BYTES = 100 * 2 ** 20  # the format's own limit on its JSON header


class SafetensorsFile:
    """A .safetensors file's tensor table, and each tensor read on demand (`part(key)`)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, Shape, int, int]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype"))
            start, end = info.get("data_offsets", (0, -1))
            shape = tuple(info.get("shape", ()))
            if dtype is None or end - start != math.prod(shape) * dtype.itemsize or self._base + end > size:
                raise ValueError(f"{path}: tensor {key} has a bad dtype, shape or offsets in the header")
            self.entries[key] = (dtype, shape, self._base + start, end - start)

    def shape(self, key: str) -> Shape:
        return self.entries[key][1]

    def part(self, key: str) -> Part:
        return lambda: self.read(key)

    def read(self, key: str) -> Tensor:
        dtype, shape, offset, nbytes = self.entries[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # fread into a fresh buffer, not a memory map: mapped pages would count as resident memory
        data = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)
        if data.size != nbytes:
            raise OSError(f"{self.path}: tensor {key} ends past the end of the file")
        return torch.from_numpy(data).view(dtype).view(shape)


# ---------------------------------------------------------------- .bin shards, one mapped at a time

class BinShards:
    """Tensors of `pytorch_model*.bin` shards: `torch.load(mmap=True)` of one shard at a time."""

    def __init__(self, files: list[Path], load: Callable[[Path], dict[str, Tensor]]):
        self._load, self._open = load, (None, {})
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, Shape] = {}
        for f in files:
            for key, t in load(f).items():  # mapped: reading the table touches no tensor data
                self.where[key], self.shapes[key] = f, tuple(t.shape)

    def part(self, key: str) -> Part:
        return lambda: self.read(key)

    def read(self, key: str) -> Tensor:
        f = self.where[key]
        if self._open[0] != f:
            self._open = (None, {})  # unmap the previous shard before mapping the next
            self._open = (f, self._load(f))
        return self._open[1][key].clone()
