"""The copy engine: background copies equal synchronous ones, errors reach wait/sync, and the
emulated link's timing (lower bounds only, so never flaky) and per-direction accounting."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from runner.copy_engine import CopyEngine, LinkEmulation, LinkSchedule
from runner.memory import Direction, Memory, Tier, TierBudgets, copy

MIB = 2 ** 20
G2C, C2G = Direction.GPU_FROM_CPU, Direction.CPU_FROM_GPU


@pytest.fixture
def memory(tmp_path: Path):
    with Memory(TierBudgets(gpu_bytes=64 * MIB, cpu_bytes=64 * MIB, offload_dir=str(tmp_path)), device="cpu") as mem:
        yield mem


def _schedule(memory: Memory, engine: CopyEngine | None, seed: int) -> list:
    """A mixed batch of copies (gathers, ranges, disk both ways), on `engine` or synchronously; the destinations."""
    gen = torch.Generator().manual_seed(seed)
    dsts = []
    for i in range(24):
        tier = (Tier.CPU, Tier.GPU, Tier.DISK)[i % 3]
        data = torch.randn(64, 16, generator=gen).to(torch.float16)
        src = memory.pool(tier).alloc(data.shape, data.dtype, f"src {i}")
        if tier == Tier.DISK:
            memory.disk.write(src, data)
        else:
            src.copy_(data)
        dst_tier = Tier.GPU if tier != Tier.GPU else (Tier.CPU, Tier.DISK)[i % 2]
        dsts.append(memory.pool(dst_tier).alloc((64, 16), torch.float16, f"dst {i}"))
        rows = torch.randperm(64, generator=gen)[:40]
        # Disjoint regions of dst, so the two copies may run in either order.
        for args in [(dsts[-1], (slice(0, 40),), src, (rows,)), (dsts[-1], (slice(40, 64),), src, (slice(0, 24),))]:
            if engine is None:
                copy(*args, memory)
            else:
                engine.submit(*args)
    return dsts


def _contents(memory: Memory, bufs: list) -> list[torch.Tensor]:
    return [memory.disk.read(b) if not isinstance(b, torch.Tensor) else b.clone() for b in bufs]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_engine_matches_synchronous_copies(tmp_path: Path, threads: int):
    results = []
    for engine_threads in (None, threads):
        with Memory(TierBudgets(offload_dir=str(tmp_path)), device="cpu") as mem:
            if engine_threads is None:
                dsts = _schedule(mem, None, seed=5)
            else:
                with CopyEngine(mem, threads=engine_threads) as engine:
                    dsts = _schedule(mem, engine, seed=5)
                    engine.sync()
            results.append((_contents(mem, dsts), mem.moved()))
    (want, want_moved), (got, got_moved) = results
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(want, got))
    assert got_moved == want_moved and want_moved["disk_read"] > 0 and want_moved["disk_write"] > 0


@pytest.mark.parametrize("threads", [0, 2])
def test_worker_exception_surfaces_on_wait_and_sync(memory: Memory, threads: int):
    src = memory.gpu.alloc((4,), torch.float32, "src")
    bad = memory.cpu.alloc((5,), torch.float32, "wrong shape")
    good = memory.cpu.alloc((4,), torch.float32, "good")
    with CopyEngine(memory, threads=threads) as engine:
        handle = engine.submit(bad, None, src, None)
        with pytest.raises(ValueError, match="shape mismatch"):
            handle.wait()
        engine.submit(good, None, src, None)
        engine.sync()  # the error was reported by wait() already: not raised twice
        engine.submit(bad, None, src, None)
        engine.submit(good, None, src, None)
        with pytest.raises(ValueError, match="shape mismatch"):
            engine.sync()  # never waited on: sync reports it
        engine.sync()  # nothing pending any more
    assert memory.moved()["cpu<-gpu"] == 2 * 16  # only the two good copies were counted


def test_threads_must_be_a_count(memory: Memory):
    with pytest.raises(ValueError, match="threads"):
        CopyEngine(memory, threads=-1)
    with pytest.raises(ValueError, match="gbps"):
        LinkEmulation(gbps=0)


# ---------------------------------------------------------------- emulated link

def test_link_schedule_serializes_a_direction_and_overlaps_the_two():
    sched = LinkSchedule(LinkEmulation(gbps=1.0))  # 10**9 bytes per second
    assert sched.reserve(G2C, 10 ** 9, now=0.0) == (0.0, 1.0)
    assert sched.reserve(C2G, 5 * 10 ** 8, now=0.0) == (0.0, 0.5)  # the other direction runs alongside
    assert sched.reserve(G2C, 10 ** 9, now=0.25) == (1.0, 2.0)  # queued behind the first
    assert sched.reserve(G2C, 10 ** 9, now=5.0) == (5.0, 6.0)  # idle link: starts at once
    assert sched.busy_s() == {G2C: 3.0, C2G: 0.5}


N = 2 * MIB  # one copy's bytes; at the link speed below it takes SECONDS
LINK = LinkEmulation(gbps=N / 0.08 / 1e9)
SECONDS = LINK.seconds(N)


def _pair(memory: Memory, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    return memory.gpu.alloc((N // 4,), torch.float32, label), memory.cpu.alloc((N // 4,), torch.float32, label)


@pytest.mark.parametrize("threads", [0, 2])
def test_emulated_copy_takes_at_least_bytes_over_bandwidth(memory: Memory, threads: int):
    gpu, cpu = _pair(memory, "x")
    cpu.copy_(torch.arange(N // 4, dtype=torch.float32))
    with CopyEngine(memory, threads=threads, link=LINK) as engine:
        start = time.perf_counter()
        engine.submit(gpu, None, cpu, None).wait()
        elapsed = time.perf_counter() - start
    assert elapsed >= SECONDS * (1 - 1e-9)
    assert torch.equal(gpu, cpu)
    assert engine.link_busy_s() == {"gpu<-cpu": pytest.approx(SECONDS), "cpu<-gpu": 0.0}
    assert engine.transfer_wait_s > 0


def test_same_direction_copies_queue_on_the_link(memory: Memory):
    (g1, c1), (g2, c2) = _pair(memory, "a"), _pair(memory, "b")
    with CopyEngine(memory, threads=2, link=LINK) as engine:
        start = time.perf_counter()
        handles = [engine.submit(g1, None, c1, None), engine.submit(g2, None, c2, None)]
        for h in handles:
            h.wait()
        elapsed = time.perf_counter() - start
    assert elapsed >= 2 * SECONDS * (1 - 1e-9)
    assert engine.link_busy_s()["gpu<-cpu"] == pytest.approx(2 * SECONDS)


def test_opposite_directions_are_booked_separately(memory: Memory):
    (g1, c1), (g2, c2) = _pair(memory, "up"), _pair(memory, "down")
    with CopyEngine(memory, threads=2, link=LINK) as engine:
        start = time.perf_counter()
        engine.submit(g1, None, c1, None)
        engine.submit(c2, None, g2, None)
        engine.sync()
        elapsed = time.perf_counter() - start
    assert elapsed >= SECONDS * (1 - 1e-9)
    # Each direction carried exactly its own copy; neither queued behind the other's bytes.
    assert engine.link_busy_s() == {"gpu<-cpu": pytest.approx(SECONDS), "cpu<-gpu": pytest.approx(SECONDS)}
    assert set(engine.stats()) == {"transfer_wait_s", "link_busy_s:gpu<-cpu", "link_busy_s:cpu<-gpu"}


def test_disk_io_is_not_emulated(memory: Memory):
    data = memory.cpu.alloc((N // 4,), torch.float32, "host")
    disk = memory.disk.alloc((N // 4,), torch.float32, "file")
    gpu = memory.gpu.alloc((N // 4,), torch.float32, "dev")
    with CopyEngine(memory, threads=1, link=LINK) as engine:
        engine.submit(disk, None, data, None).wait()
        assert engine.link_busy_s() == {"gpu<-cpu": 0.0, "cpu<-gpu": 0.0}
        engine.submit(gpu, None, disk, None).wait()  # staged through host memory: the link part is emulated
    assert engine.link_busy_s() == {"gpu<-cpu": pytest.approx(SECONDS), "cpu<-gpu": 0.0}
