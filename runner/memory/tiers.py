"""Memory tiers for block-scheduled offloading: byte budgets, exact accounting and one copy.

Three tiers (GPU, CPU, disk), each a pool with a byte budget that refuses an allocation *before*
making it (`BudgetError`), and tracks bytes in use and the peak. `Memory` holds the three pools and
counts the bytes every `copy` moves per link direction (`Direction`), for CSV rows.

Tier of a tensor: each pool keeps its live allocations keyed by storage address, so a tensor from
`Pool.alloc` (or any view of it) knows its tier. A tensor no pool allocated (e.g. the output of a
compute op) counts as GPU tier when it lives on the compute device, else as CPU tier. On a CPU-only
machine the compute device *is* the CPU: the GPU tier is then a pool on the CPU device with its own
budget, and GPU <-> CPU transfers are real copies between separate buffers, so schedules, budgets
and byte counts are the same as on a GPU machine; only the link speed is not (see
`runner.memory.copy_engine.LinkEmulation`).

Disk tensors (see `runner.memory.pools`) are files under `<offload_dir>/run-<host>-<pid>-<random>/`, memory-mapped (`torch.from_file`),
handed out as `DiskTensor` handles rather than in-RAM tensors. The run directory is removed by
`DiskPool.close()` (also on leaving its `with` block, normally, by an exception or by Ctrl-C's
KeyboardInterrupt), when the pool is garbage-collected, and at interpreter exit.
"""
from __future__ import annotations

import enum
import threading
from typing import Any

import torch
from torch import Tensor

from runner.memory.pools import (BudgetError, DiskPool, DiskSpaceError, DiskTensor, Pool, Reservation,  # noqa: F401
                                 Tier, TierBudgets)


class Direction(str, enum.Enum):
    """A link direction whose bytes `copy` counts."""
    GPU_FROM_CPU = "gpu<-cpu"
    CPU_FROM_GPU = "cpu<-gpu"
    DISK_READ = "disk_read"
    DISK_WRITE = "disk_write"


# The links a copy from tier A to tier B crosses. Disk <-> GPU goes through host memory, so it counts
# on both of its links; a copy within the GPU or CPU tier crosses none.
_ROUTES: dict[tuple[Tier, Tier], tuple[Direction, ...]] = {
    (Tier.CPU, Tier.GPU): (Direction.GPU_FROM_CPU,),
    (Tier.GPU, Tier.CPU): (Direction.CPU_FROM_GPU,),
    (Tier.DISK, Tier.CPU): (Direction.DISK_READ,),
    (Tier.CPU, Tier.DISK): (Direction.DISK_WRITE,),
    (Tier.DISK, Tier.GPU): (Direction.DISK_READ, Direction.GPU_FROM_CPU),
    (Tier.GPU, Tier.DISK): (Direction.CPU_FROM_GPU, Direction.DISK_WRITE),
    (Tier.DISK, Tier.DISK): (Direction.DISK_READ, Direction.DISK_WRITE),
}

# An index into a tensor, as Python indexing takes it (slices, ints, index tensors); None = whole.
Index = tuple[Any, ...] | None


class Memory:
    """The three tiers for one run, and the bytes moved per direction between them."""

    def __init__(self, budgets: TierBudgets, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # Pinned host memory makes host <-> GPU copies DMA directly (and lets them run async on a stream).
        self.gpu = Pool(Tier.GPU, budgets.gpu_bytes, self.device)
        self.cpu = Pool(Tier.CPU, budgets.cpu_bytes, "cpu", pin=self.device.type == "cuda")
        self.disk = DiskPool(budgets.offload_dir, budgets.disk_bytes, page_cache=budgets.disk_page_cache)
        self._moved = {d: 0 for d in Direction}
        self._lock = threading.Lock()

    def pool(self, tier: Tier) -> Pool | DiskPool:
        return {Tier.GPU: self.gpu, Tier.CPU: self.cpu, Tier.DISK: self.disk}[Tier(tier)]

    def tier_of(self, x: Tensor | DiskTensor) -> Tier:
        """Where `x` lives (see the module docstring for tensors no pool allocated)."""
        if isinstance(x, DiskTensor):
            return Tier.DISK
        if self.gpu.owns(x):
            return Tier.GPU
        if self.cpu.owns(x):
            return Tier.CPU
        return Tier.GPU if x.device.type == self.device.type else Tier.CPU

    def peaks(self) -> dict[str, int]:
        """Peak bytes in use per tier, e.g. {'gpu': ..., 'cpu': ..., 'disk': ...}."""
        return {t.value: self.pool(t).peak for t in Tier}

    def moved(self) -> dict[str, int]:
        """Bytes copied per direction so far, e.g. {'gpu<-cpu': ..., 'disk_read': ...}."""
        with self._lock:
            return {d.value: n for d, n in self._moved.items()}

    def count(self, direction: Direction, nbytes: int) -> None:
        with self._lock:
            self._moved[Direction(direction)] += nbytes

    def close(self) -> None:
        self.disk.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _normalize(index: Any) -> Index:
    """A tuple (a bare slice or index tensor is wrapped), or None for the whole tensor."""
    return index if index is None or isinstance(index, tuple) else (index,)


def _on(index: Index, device: torch.device) -> Index:
    """`index` with its index tensors moved to `device` (indexing wants them beside the data)."""
    return None if index is None else tuple(i.to(device) if isinstance(i, Tensor) else i for i in index)


def _is_view_index(index: Index) -> bool:
    """Whether `index` selects a view (basic indexing). Anything else (index tensors, masks, lists,
    arrays) selects a copy, so writing must scatter into dst instead of copying into that copy."""
    return index is None or all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in index)


def copy(dst: Tensor | DiskTensor, dst_idx: Index, src: Tensor | DiskTensor, src_idx: Index,
         memory: Memory, *, non_blocking: bool = False) -> dict[Direction, int]:
    """dst[dst_idx] = src[src_idx], between any two tiers; counts the bytes on each link it crosses.

    Index tensors gather (in `src_idx`) or scatter (in `dst_idx`) in one batched op, e.g.
    `copy(dst, (slice(0, m),), src, (rows,), memory)` packs rows `rows` of src into dst[:m].
    A bare slice or index tensor may stand for a 1-tuple. Pass disk tensors as their `DiskTensor`
    handle (a `DiskPool.view` tensor would count as a GPU/CPU tensor). Dtypes must match (no silent
    casts: a cast would change the bytes moved). Returns the bytes counted per direction (empty for
    a copy within one tier). `non_blocking` is passed to the final `copy_` into a view of dst (the CUDA
    copy engine's side streams, `runner.memory.cuda_copy`); a scatter into dst always blocks, because a
    non-blocking device->host `.to()` would hand index_put a host tensor that is not filled yet.
    """
    dst_idx, src_idx = _normalize(dst_idx), _normalize(src_idx)
    if _whole_file_io(dst, dst_idx, src, src_idx, memory):
        return _counted(memory, src, dst, dst.nbytes if isinstance(dst, DiskTensor) else src.nbytes)
    src_t = memory.disk.view(src) if isinstance(src, DiskTensor) else src
    dst_t = memory.disk.view(dst) if isinstance(dst, DiskTensor) else dst
    if src_t.dtype != dst_t.dtype:
        raise TypeError(f"copy: dtype mismatch, {src_t.dtype} -> {dst_t.dtype}")
    part = src_t if src_idx is None else src_t[_on(src_idx, src_t.device)]
    if _is_view_index(dst_idx):
        target = dst_t if dst_idx is None else dst_t[dst_idx]
        if target.shape != part.shape:  # copy_ would broadcast, and the byte count would be wrong
            raise ValueError(f"copy: shape mismatch, {tuple(part.shape)} -> {tuple(target.shape)}")
        target.copy_(part, non_blocking=non_blocking)
    else:
        dst_t[_on(dst_idx, dst_t.device)] = part.to(dst_t.device)
    for x in (src, dst):
        if isinstance(x, DiskTensor):
            memory.disk.after_io(x)  # a pool without page cache evicts the file now
    return _counted(memory, src, dst, part.numel() * part.element_size())


def _whole_file_io(dst: Tensor | DiskTensor, dst_idx: Index, src: Tensor | DiskTensor, src_idx: Index,
                   memory: Memory) -> bool:
    """A whole disk tensor to or from a whole contiguous host tensor moves by file I/O (the disk pool's
    `read_into` / `write`), never through the file's memory map: streamed weights then never count as
    resident memory. Returns whether it did; anything else goes through the map."""
    if dst_idx is not None or src_idx is not None or isinstance(dst, DiskTensor) == isinstance(src, DiskTensor):
        return False
    disk, host = (src, dst) if isinstance(src, DiskTensor) else (dst, src)
    if host.device.type != "cpu" or not host.is_contiguous() or host.dtype != disk.dtype:
        return False
    if tuple(host.shape) != disk.shape:
        raise ValueError(f"copy: shape mismatch, {tuple(src.shape)} -> {tuple(dst.shape)}")
    if disk is src:
        memory.disk.read_into(disk, host)
    else:
        memory.disk.write(disk, host)
    return True


def _counted(memory: Memory, src: Tensor | DiskTensor, dst: Tensor | DiskTensor, nbytes: int) -> dict[Direction, int]:
    moved = {d: nbytes for d in _ROUTES.get((memory.tier_of(src), memory.tier_of(dst)), ())}
    for d, n in moved.items():
        memory.count(d, n)
    return moved
