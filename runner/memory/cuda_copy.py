"""Copies on side CUDA streams, for `runner.memory.copy_engine.CopyEngine` when the compute device is CUDA.

Each copy-engine worker thread gets its own side stream (created lazily in that thread, so at most
`threads` streams), and a copy runs on it as follows:

1. In the caller's thread, at submit: an event is recorded on the compute stream (the caller's
   current stream). The side stream waits on it before copying, so the copy sees every kernel the
   caller issued before submitting: a write-after-read hazard (prefetching weights into the staging
   slot the previous layer computed from) and a read-after-write one (offloading KV or activations
   that compute just produced) are both ordered by the GPU itself, without blocking the host.
2. In the worker: the copy is issued on the side stream with `non_blocking=True` when every host
   tensor involved is pinned (the cpu pool pins on CUDA); pageable host memory (the disk tier's
   memory maps, any unpooled CPU tensor) gets a blocking copy, which CUDA would do anyway for
   pageable memory, so the worker thread waits there, not the caller. CUDA tensors are marked as
   used by the side stream (`record_stream`), so the caching allocator does not hand their memory
   to another stream while the copy may still run, even if a pool frees them early.
3. An event is recorded on the side stream after the copy; `SideStreams.wait` synchronizes on it.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from runner.memory.tiers import DiskTensor, Direction, Index, Memory, copy


def _device(memory: Memory) -> torch.device:
    """The compute device with an index: worker threads start on device 0 whatever the caller uses."""
    d = memory.device
    return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())


def _pinned_or_cuda(x: Tensor | DiskTensor) -> bool:
    """Whether a non-blocking copy may read or write `x` asynchronously (pageable memory may not)."""
    return isinstance(x, Tensor) and (x.is_cuda or x.is_pinned())


class SideStreams:
    """One side stream per calling thread, the events that order copies with compute, and waiting."""

    def __init__(self, memory: Memory):
        if memory.device.type != "cuda":
            raise ValueError(f"side streams: the compute device must be CUDA, got {memory.device}")
        self.memory, self.device = memory, _device(memory)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.streams: list[torch.cuda.Stream] = []  # every stream created (at most one per worker thread)

    def stream(self) -> torch.cuda.Stream:
        """This thread's side stream, created on first use."""
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(device=self.device)
            with self._lock:
                self.streams.append(s)
        return s

    def mark_compute(self) -> torch.cuda.Event:
        """An event after everything the calling thread has issued on its current (compute) stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def run(self, dst: Tensor | DiskTensor, dst_idx: Index, src: Tensor | DiskTensor, src_idx: Index,
            after: torch.cuda.Event) -> tuple[dict[Direction, int], torch.cuda.Event]:
        """Issue dst[dst_idx] = src[src_idx] on this thread's side stream once `after` has passed;
        returns the bytes counted per direction and an event that completes with the copy."""
        stream = self.stream()
        non_blocking = _pinned_or_cuda(dst) and _pinned_or_cuda(src)
        # torch.cuda.device: index tensors and gather temporaries go to the compute device, not device 0.
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            stream.wait_event(after)
            moved = copy(dst, dst_idx, src, src_idx, self.memory, non_blocking=non_blocking)
            for t in (dst, src):
                if isinstance(t, Tensor) and t.is_cuda:
                    t.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    @staticmethod
    def wait(done: torch.cuda.Event) -> None:
        """Block the host until the copy behind `done` has finished.

        Why the host blocks (`event.synchronize()`) rather than only the compute stream
        (`current_stream().wait_event(done)`):
        - the data is then safe for every consumer, not only the waiting thread's current stream: the
          host reading a cpu<-gpu copy's pinned destination (or writing it to disk), another stream,
          or a later copy that reads what this one wrote;
        - `CopyEngine.transfer_wait_s` keeps its meaning on every device, time the caller really could
          not proceed, so overlap on/off and FlexGen/ALISA rows compare like for like.
        The cost is that the host stops queueing kernels ahead while it waits; the executor waits just
        before computing with the data, when the kernels queued before it still keep the GPU busy.
        """
        done.synchronize()
