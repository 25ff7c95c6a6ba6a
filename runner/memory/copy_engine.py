"""Asynchronous copies between memory tiers, with an optional emulated host <-> GPU link.

`CopyEngine.submit` runs `runner.memory.tiers.copy` on a small pool of background threads (torch copies
release the GIL, so they overlap with compute on the caller's thread) and returns a `Handle`;
`Handle.wait()` blocks until that copy is done and re-raises its exception, `sync()` waits for all.
In-flight copies are not ordered with each other: wait on a copy before submitting one that
reads what it writes. `threads=0` runs each copy inside `submit` (overlap off) with the same
results and the same error reporting (at wait/sync).

On CUDA (the Memory's compute device) with threads > 0, each worker issues its copies on its own
side stream, after the compute already issued by the submitter, non-blocking from pinned host memory,
and `Handle.wait()` synchronizes on an event recorded after the copy (`runner.memory.cuda_copy`, which says
why); the counters keep their meaning (host time blocked in wait, link time per direction).
`threads=0` copies synchronously on the caller's stream, as on the CPU. Either way, wait on a copy
before freeing or rewriting a buffer it reads or writes.

`LinkEmulation` makes a CPU-only machine behave like one with a slow PCIe link: each GPU <-> CPU
copy (either direction; disk I/O is real, not emulated) occupies its direction of the link for
bytes / bandwidth, and copies in one direction queue behind each other, like a DMA engine per
direction. The data is copied at memory speed; what is emulated is when its handle completes, so
waiting and overlap cost real wall-clock time.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
import torch
from torch import Tensor

from runner.memory.cuda_copy import SideStreams
from runner.memory.tiers import DiskTensor, Direction, Index, Memory, copy

# Directions a LinkEmulation slows down; disk reads and writes run at the real disk's speed.
EMULATED = (Direction.GPU_FROM_CPU, Direction.CPU_FROM_GPU)
_PRUNE_AT = 256  # pending handles kept before finished ones are dropped


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinkEmulation:
    """A host <-> GPU link of `gbps` GB/s (10**9 bytes per second) in each direction."""
    gbps: float

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise ValueError(f"link gbps: must be > 0, got {self.gbps}")

    def seconds(self, nbytes: int) -> float:
        return nbytes / (self.gbps * 1e9)


class LinkSchedule:
    """When each emulated transfer occupies its direction of the link (one queue per direction)."""

    def __init__(self, link: LinkEmulation):
        self.link = link
        self._free_at = {d: 0.0 for d in EMULATED}  # when the direction's last transfer ends
        self._busy = {d: 0.0 for d in EMULATED}
        self._lock = threading.Lock()

    def reserve(self, direction: Direction, nbytes: int, now: float) -> tuple[float, float]:
        """Book `nbytes` on `direction` from `now` or when the previous transfer ends: (start, end)."""
        duration = self.link.seconds(nbytes)
        with self._lock:
            start = max(now, self._free_at[direction])
            self._free_at[direction] = end = start + duration
            self._busy[direction] += duration
        return start, end

    def busy_s(self) -> dict[Direction, float]:
        """Seconds each direction has been booked so far."""
        with self._lock:
            return dict(self._busy)


def _sleep_until(deadline: float) -> None:
    # A loop, so the deadline holds even if a sleep returns early.
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)


class Handle:
    """One submitted copy. Its future's result is (when the link delivers the data, CUDA event or None)."""

    def __init__(self, engine: CopyEngine, future: Future):
        self._engine, self._future = engine, future
        self._waited = False

    def done(self) -> bool:
        """Whether the data is copied (an emulated link may still hold the handle in `wait`)."""
        if not self._future.done():
            return False
        if self._future.exception() is not None:
            return True
        event = self._future.result()[1]
        return event is None or event.query()

    def wait(self) -> None:
        """Block until the copy is done and its link time has passed; re-raises the copy's exception."""
        start = time.perf_counter()
        try:
            ready, event = self._future.result()
            if event is not None:
                SideStreams.wait(event)
            _sleep_until(ready)  # an emulated link may deliver later than the copy finished
        finally:
            self._waited = True
            self._engine._add_wait(time.perf_counter() - start)


class CopyEngine:
    """Runs `copy(dst, dst_idx, src, src_idx, memory)` calls on background threads."""

    def __init__(self, memory: Memory, *, threads: int = 2, link: LinkEmulation | None = None):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"copy threads: must be an integer >= 0, got {threads!r}")
        self.memory, self.threads = memory, threads
        self.schedule = LinkSchedule(link) if link is not None else None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="copy") if threads else None
        # Overlap on CUDA needs side streams: a worker thread on the compute stream would serialize with compute.
        self.streams = SideStreams(memory) if threads and memory.device.type == "cuda" else None
        self._pending: list[Handle] = []
        self._wait_s = 0.0
        self._lock = threading.Lock()

    def submit(self, dst: Tensor | DiskTensor, dst_idx: Index, src: Tensor | DiskTensor,
               src_idx: Index) -> Handle:
        """Start dst[dst_idx] = src[src_idx]; with threads=0 it is done (link time included) on return."""
        args = (dst, dst_idx, src, src_idx)
        if self._pool is not None:
            after = self.streams.mark_compute() if self.streams is not None else None
            handle = Handle(self, self._pool.submit(self._run, *args, after))
        else:
            future: Future = Future()
            # Overlap off: the caller is blocked for the copy itself (e.g. a disk read) and any link time,
            # so both count as waiting, as the same copy's time counts in wait() with threads.
            start = time.perf_counter()
            try:
                ready, event = self._run(*args)
            except Exception as e:  # reported at wait/sync, as from a worker thread
                future.set_exception(e)
            else:
                future.set_result((ready, event))
                _sleep_until(ready)  # the caller pays the link time now
            finally:
                self._add_wait(time.perf_counter() - start)
            handle = Handle(self, future)
        with self._lock:
            if len(self._pending) >= _PRUNE_AT:
                self._pending = [h for h in self._pending if not (h.done() and h._waited)]
            self._pending.append(handle)
        return handle

    def sync(self) -> None:
        """Wait for every submitted copy; raises the first exception no `wait()` has reported yet."""
        with self._lock:
            pending, self._pending = self._pending, []
        error: BaseException | None = None
        for handle in pending:
            reported = handle._waited
            try:
                handle.wait()
            except Exception as e:
                if error is None and not reported:
                    error = e
        if error is not None:
            raise error

    def _run(self, dst: Tensor | DiskTensor, dst_idx: Index, src: Tensor | DiskTensor, src_idx: Index,
             after: torch.cuda.Event | None = None) -> tuple[float, torch.cuda.Event | None]:
        """Do the copy (on CUDA with threads: issue it on a side stream once `after` has passed); return
        when its data arrives on an emulated link (else when the copy was issued), and the CUDA event
        that completes with it (None when the copy is already complete)."""
        start = time.perf_counter()
        event = None
        # Worker threads do not inherit the caller's inference mode, and buffers allocated under it
        # (KV caches built inside generate) may only be written in it; copies are never differentiated.
        with torch.inference_mode():
            if self.streams is not None:
                moved, event = self.streams.run(dst, dst_idx, src, src_idx, after)
            else:
                moved = copy(dst, dst_idx, src, src_idx, self.memory)
        ready = start
        if self.schedule is not None:
            # The link starts carrying the copy when a worker picks it up, as a DMA engine would.
            for d in EMULATED:
                if moved.get(d):
                    ready = max(ready, self.schedule.reserve(d, moved[d], start)[1])
        return ready, event

    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self._wait_s += seconds

    @property
    def transfer_wait_s(self) -> float:
        """Seconds callers spent blocked on copies (in wait/sync, or in submit when threads=0)."""
        return self._wait_s

    def link_busy_s(self) -> dict[str, float]:
        """Emulated link time booked per direction, e.g. {'gpu<-cpu': ...}; zeros without emulation."""
        busy = self.schedule.busy_s() if self.schedule is not None else {}
        return {d.value: busy.get(d, 0.0) for d in EMULATED}

    def stats(self) -> dict[str, float]:
        """Flat counters for a CSV row."""
        return {"transfer_wait_s": self.transfer_wait_s,
                **{f"link_busy_s:{d}": s for d, s in self.link_busy_s().items()}}

    def close(self) -> None:
        """Stop the threads once in-flight copies finish (call sync() first to see their errors)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
