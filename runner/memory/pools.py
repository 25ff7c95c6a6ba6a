"""Memory tiers' allocators: byte budgets that refuse an allocation before making it, exact
in-use and peak accounting, and the disk tier's file-backed tensors.

`Pool` (GPU or CPU tier) hands out tensors on a device; `DiskPool` hands out `DiskTensor` handles
to memory-mapped files under `<offload_dir>/run-<host>-<pid>-<random>/`, removed by `close()` (also on
leaving its `with` block, normally, by an exception or by Ctrl-C's KeyboardInterrupt), when the
pool is garbage-collected, and at interpreter exit; a run killed outright (SIGKILL, OOM) leaves its
directory to the next pool opened on the same offload dir on the same host, which removes it
(`runner.memory.stale.remove_stale_runs`).
Whole tensors move by `preadv`/`pwritev` (`read_into`, `write`); a file is memory-mapped only for indexed
copies (`view`), so streamed weights never count as resident memory. A `DiskPool(page_cache=False)` evicts each file
from the OS page cache after every write and read, so reads measure the device rather than spare RAM.
`runner.memory.tiers` puts the pools together and counts the bytes copied between them.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import itertools
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from runner.memory.stale import remove_stale_runs, run_dir_prefix
from runner.units import format_bytes, gib_to_bytes

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # for madvise on torch's map


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). A batch's
    KV cache, freed when the batch ends, otherwise stays resident in the heap, and whatever the process
    allocates next from elsewhere (Python's own arenas: drawing report.png) adds to its peak RSS."""
    try:
        trim = _LIBC.malloc_trim if _LIBC is not None else None
    except AttributeError:  # a libc without it (musl)
        return
    if trim is not None:
        trim(0)


class Tier(str, enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


class BudgetError(RuntimeError):
    """An allocation or reservation that would exceed a tier's budget (nothing was allocated)."""

    def __init__(self, tier: Tier, label: str, nbytes: int, budget: int, in_use: int):
        self.tier, self.label, self.nbytes, self.budget, self.in_use = tier, label, nbytes, budget, in_use
        free = max(budget - in_use, 0)
        super().__init__(f"{tier.value}: {label} needs {format_bytes(nbytes)} but only {format_bytes(free)} "
                         f"of the {format_bytes(budget)} budget is free")


class DiskSpaceError(RuntimeError):
    """The disk tier's plan needs more bytes than its filesystem has free (nothing was written)."""

    def __init__(self, root: str, label: str, nbytes: int, free: int):
        super().__init__(f"{label} needs {format_bytes(nbytes)} on disk but the filesystem of "
                         f"{os.path.dirname(root)} has only {format_bytes(free)} free")


def _check_budget(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}: must be an integer >= 0 or None (unlimited), got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TierBudgets:
    """Byte budget per tier (None = unlimited) and where disk tensors go."""
    gpu_bytes: int | None = None
    cpu_bytes: int | None = None
    disk_bytes: int | None = None
    offload_dir: str
    disk_page_cache: bool = True  # False: disk files leave the OS page cache after each write and read

    def __post_init__(self) -> None:
        for name, value in self.budgets().items():
            _check_budget(f"{name.value}_bytes", value)

    @classmethod
    def from_gib(cls, *, offload_dir: str, gpu_gib: float | None = None, cpu_gib: float | None = None,
                 disk_gib: float | None = None, disk_page_cache: bool = True) -> TierBudgets:
        """Budgets in GiB (2**30 bytes, as `hardware.gpu_gib`), rounded down to whole bytes."""
        def to_bytes(gib: float | None) -> int | None:
            return None if gib is None else int(gib_to_bytes(gib))
        return cls(gpu_bytes=to_bytes(gpu_gib), cpu_bytes=to_bytes(cpu_gib), disk_bytes=to_bytes(disk_gib),
                   offload_dir=offload_dir, disk_page_cache=disk_page_cache)

    def budgets(self) -> dict[Tier, int | None]:
        return {Tier.GPU: self.gpu_bytes, Tier.CPU: self.cpu_bytes, Tier.DISK: self.disk_bytes}

    def budget(self, tier: Tier) -> int | None:
        return self.budgets()[Tier(tier)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reservation:
    """Bytes held against a budget without allocating them (see `Pool.reserve`)."""
    tier: Tier
    label: str
    nbytes: int
    key: int  # unique per reservation, so equal sizes and labels stay distinct


_reservation_keys = itertools.count()


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class _Budgeted:
    """Byte accounting shared by `Pool` and `DiskPool`; thread-safe (copy threads may free/alloc)."""

    def __init__(self, tier: Tier, budget: int | None):
        _check_budget(f"{tier.value} budget", budget)
        self.tier, self.budget = tier, budget
        self._in_use = self._peak = 0
        self._lock = threading.Lock()
        self._reserved: dict[int, Reservation] = {}

    @property
    def in_use(self) -> int:
        """Bytes allocated plus bytes reserved."""
        return self._in_use

    @property
    def peak(self) -> int:
        return self._peak

    def free_bytes(self) -> int | None:
        """Bytes still allowed, or None when unlimited."""
        return None if self.budget is None else max(self.budget - self._in_use, 0)

    def reset_peak(self) -> None:
        """Start a new peak measurement from what is in use now (e.g. per phase)."""
        with self._lock:
            self._peak = self._in_use

    def reserve(self, nbytes: int, label: str) -> Reservation:
        """Hold `nbytes` against the budget (e.g. a whole plan, checked up front); `release` returns them."""
        self._take(nbytes, label)
        r = Reservation(tier=self.tier, label=label, nbytes=nbytes, key=next(_reservation_keys))
        with self._lock:
            self._reserved[r.key] = r
        return r

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            if self._reserved.pop(reservation.key, None) is None:
                raise ValueError(f"{self.tier.value}: reservation {reservation.label!r} is not held "
                                 "(released twice, or from another pool)")
            self._in_use -= reservation.nbytes

    def _take(self, nbytes: int, label: str) -> None:
        if nbytes < 0:
            raise ValueError(f"{self.tier.value}: {label} asks for {nbytes} bytes")
        with self._lock:
            if self.budget is not None and self._in_use + nbytes > self.budget:
                raise BudgetError(self.tier, label, nbytes, self.budget, self._in_use)
            self._in_use += nbytes
            self._peak = max(self._peak, self._in_use)

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._in_use -= nbytes


class Pool(_Budgeted):
    """One tier's allocator on a torch device (the GPU tier, or the CPU tier in host memory)."""

    def __init__(self, tier: Tier, budget: int | None, device: torch.device | str, *, pin: bool = False):
        super().__init__(tier, budget)
        self.device, self.pin = torch.device(device), pin
        # storage address -> (tensor, bytes). Holding the tensor keeps its memory from being reused by
        # another allocation until `free`, so an address never names two live tensors.
        self._live: dict[int, tuple[Tensor, int]] = {}

    def alloc(self, shape: Sequence[int], dtype: torch.dtype, label: str) -> Tensor:
        """An uninitialised tensor, accounted; raises BudgetError (allocating nothing) if over budget."""
        nbytes = _nbytes(shape, dtype)
        self._take(nbytes, label)
        try:
            t = torch.empty(tuple(shape), dtype=dtype, device=self.device, pin_memory=self.pin)
        except BaseException:
            self._give(nbytes)
            raise
        if nbytes:  # empty tensors share address 0: nothing to account or look up
            with self._lock:
                self._live[t.untyped_storage().data_ptr()] = (t, nbytes)
        return t

    def free(self, t: Tensor) -> None:
        """Return an allocation (`t` or any view of it: the whole allocation goes)."""
        if t.numel() == 0:
            return
        with self._lock:
            entry = self._live.pop(t.untyped_storage().data_ptr(), None)
        if entry is None:
            raise ValueError(f"{self.tier.value}: free of a tensor this pool did not allocate (or freed already)")
        self._give(entry[1])

    def owns(self, t: Tensor) -> bool:
        return t.numel() > 0 and t.untyped_storage().data_ptr() in self._live


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiskTensor:
    """A handle to a tensor stored in a file of a `DiskPool` (read and write it through the pool or `copy`)."""
    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


class DiskPool(_Budgeted):
    """Disk tier: one file per tensor under a fresh run directory inside `offload_dir`.

    With `page_cache=False` every write and read (`write`, `read`, and `runner.memory.tiers.copy` through
    `after_io`) ends by evicting the file from the OS page cache, so the next read of it comes from the
    device. Otherwise spare RAM keeps the files cached and "disk" reads run at memory speed.
    """

    def __init__(self, offload_dir: str, budget: int | None = None, *, page_cache: bool = True):
        super().__init__(Tier.DISK, budget)
        if not page_cache and _LIBC is None:
            raise ValueError("disk: page_cache=False (evicting files from the page cache) needs Linux")
        self.page_cache = page_cache
        os.makedirs(offload_dir, mode=0o700, exist_ok=True)  # private when created here; an existing one keeps its mode
        self.removed_stale = remove_stale_runs(offload_dir)
        self.root = tempfile.mkdtemp(prefix=f"{run_dir_prefix()}-", dir=offload_dir)  # mode 0700
        self._held: dict[str, DiskTensor] = {}  # path -> handle, for every live file
        self._maps: dict[str, Tensor] = {}  # path -> shared memory map of the file, once `view` made one
        self._names = itertools.count()
        # Runs on close(), on garbage collection, and at interpreter exit (weakref.finalize registers with
        # atexit), so a KeyboardInterrupt that ends the program outside any `with` still removes the files.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return not self._cleanup.alive

    def check_space(self, nbytes: int, label: str) -> None:
        """Refuse (`DiskSpaceError`) a plan of `nbytes` more than the filesystem has free: files are sparse
        until written, so without this a plan bigger than the disk dies mid-run of SIGBUS or ENOSPC."""
        free = shutil.disk_usage(self.root).free
        if nbytes > free:
            raise DiskSpaceError(self.root, label, nbytes, free)

    def alloc(self, shape: Sequence[int], dtype: torch.dtype, label: str) -> DiskTensor:
        """A file of the tensor's size (contents unspecified); raises BudgetError if over budget."""
        if self.closed:
            raise ValueError(f"disk: alloc of {label} after close()")
        dt = DiskTensor(path=os.path.join(self.root, f"{next(self._names):06d}.bin"), shape=tuple(shape),
                        dtype=dtype, label=label)
        self._take(dt.nbytes, label)
        try:
            with open(dt.path, "wb") as f:
                f.truncate(dt.nbytes)  # sparse until written: no disk traffic for the allocation itself
        except BaseException:
            self._give(dt.nbytes)
            raise
        self._held[dt.path] = dt
        return dt

    def free(self, dt: DiskTensor) -> None:
        if self._held.pop(dt.path, None) is None:
            raise ValueError(f"disk: free of {dt.label!r}, which this pool does not hold (or freed already)")
        self._maps.pop(dt.path, None)
        os.remove(dt.path)
        self._give(dt.nbytes)

    def owns(self, dt: DiskTensor) -> bool:
        return dt.path in self._held

    def view(self, dt: DiskTensor) -> Tensor:
        """The file as a CPU tensor (a shared memory map, made on first use: writes to it land in the file).
        Whole-tensor reads and writes (`read_into`, `write`) use file I/O instead, so that weights streamed
        from disk never count as the process's resident memory."""
        if dt.path not in self._held:
            raise ValueError(f"disk: {dt.label!r} is not held by this pool (freed, or pool closed)")
        data = self._maps.get(dt.path)
        if data is None:
            numel = math.prod(dt.shape)
            data = (torch.from_file(dt.path, shared=True, size=numel, dtype=dt.dtype) if numel
                    else torch.empty(0, dtype=dt.dtype)).view(dt.shape)
            self._maps[dt.path] = data
        return data

    def read(self, dt: DiskTensor, rows: slice | Tensor | None = None) -> Tensor:
        """A copy in RAM of the whole tensor or of `rows` along dim 0. Not counted: schedulers use `copy`."""
        if rows is None:
            out = torch.empty(dt.shape, dtype=dt.dtype)
            self.read_into(dt, out)
            return out
        out = self.view(dt)[rows].clone()
        self.after_io(dt)
        return out

    def read_into(self, dt: DiskTensor, out: Tensor) -> None:
        self._io(dt, out, write=False)  # the whole file into a contiguous CPU tensor of its size, by preadv

    def write(self, dt: DiskTensor, src: Tensor, rows: slice | Tensor | None = None) -> None:
        """Store `src` as the whole tensor or as `rows` along dim 0. Not counted: schedulers use `copy`."""
        if rows is None and src.device.type == "cpu":
            self._io(dt, src.to(dt.dtype).contiguous(), write=True)
            return
        data = self.view(dt)
        if rows is None:
            data.copy_(src)
        else:
            data[rows] = src.to(data.device)
        self.after_io(dt)

    def _io(self, dt: DiskTensor, buf: Tensor, *, write: bool) -> None:
        if dt.path not in self._held:
            raise ValueError(f"disk: {dt.label!r} is not held by this pool (freed, or pool closed)")
        if buf.nbytes != dt.nbytes or not buf.is_contiguous() or buf.device.type != "cpu":
            raise ValueError(f"disk: {dt.label!r} needs a contiguous CPU buffer of {dt.nbytes} bytes")
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy()) if dt.nbytes else memoryview(b"")
        fd = os.open(dt.path, os.O_WRONLY if write else os.O_RDONLY)
        try:
            done = 0
            while done < len(view):  # a call moves at most ~2 GiB: loop
                n = (os.pwritev if write else os.preadv)(fd, [view[done:]], done)
                if n <= 0:
                    raise OSError(f"disk: {dt.label!r}: {'write' if write else 'read'} stopped at byte {done}")
                done += n
        finally:
            os.close(fd)
        self.after_io(dt)

    def after_io(self, dt: DiskTensor) -> None:
        """Called after each read or write of `dt`: evicts its file from the page cache if this pool has none."""
        if not self.page_cache:
            self.drop_cache(dt)

    def drop_cache(self, dt: DiskTensor) -> None:
        """Write `dt`'s dirty pages to the device and evict its file from the OS page cache."""
        data = self._maps.get(dt.path)
        # The kernel keeps pages that a process has mapped (fadvise skips them), and our map of the file
        # stays for the pool's life: unmap its pages first. The map stays valid; the next access faults
        # them back in from the file. Only a map starting on a page boundary is released (torch.from_file
        # maps from offset 0, so it always does); a tensor of zero bytes has no map.
        addr, nbytes = (data.data_ptr() if data is not None else 0), dt.nbytes
        if addr and nbytes and addr % mmap.PAGESIZE == 0 and _LIBC is not None:
            if _LIBC.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), _MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"disk: madvise of {dt.label!r}: {os.strerror(err)}")
        fd = os.open(dt.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be evicted: write them out first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Delete the run directory and every file in it; idempotent."""
        self._maps.clear()
        self._held.clear()
        self._cleanup()

    def __enter__(self) -> DiskPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
