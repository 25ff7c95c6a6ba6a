"""The copy engine: background copies equal synchronous ones, errors reach wait/sync, and the
emulated link's timing (lower bounds only, so never flaky) and per-direction accounting.

Tests taking `compute_device` also run on CUDA with ALISA_TEST_DEVICE=cuda (tests/gpu/check.sh); the
ones at the end need CUDA (side streams, their ordering with compute) and skip without it."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from runner.memory.copy_engine import CopyEngine, LinkEmulation, LinkSchedule
from runner.memory.tiers import Direction, Memory, Tier, TierBudgets, copy

MIB = 2 ** 20
G2C, C2G = Direction.GPU_FROM_CPU, Direction.CPU_FROM_GPU


@pytest.fixture
def memory(tmp_path: Path):
    with Memory(TierBudgets(gpu_bytes=64 * MIB, cpu_bytes=64 * MIB, offload_dir=str(tmp_path)), device="cpu") as mem:
        yield mem


def _schedule(memory: Memory, engine: CopyEngine | None, seed: int) -> list:
    """A mixed batch of copies (gathers, ranges, scatters, disk both ways), on `engine` or synchronously;
    the destinations."""
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
        scatter = 52 + torch.randperm(12, generator=gen)
        # Disjoint regions of dst, so the three copies may run in any order.
        for args in [(dsts[-1], (slice(0, 40),), src, (rows,)), (dsts[-1], (slice(40, 52),), src, (slice(0, 12),)),
                     (dsts[-1], (scatter,), src, (slice(20, 32),))]:
            if engine is None:
                copy(*args, memory)
            else:
                engine.submit(*args)
    return dsts


def _contents(memory: Memory, bufs: list) -> list[torch.Tensor]:
    return [memory.disk.read(b) if not isinstance(b, torch.Tensor) else b.clone() for b in bufs]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_engine_matches_synchronous_copies(compute_device: torch.device, tmp_path: Path, threads: int):
    """72 copies in flight at once (on CUDA: on side streams) give what synchronous copies give."""
    results = []
    for engine_threads in (None, threads):
        with Memory(TierBudgets(offload_dir=str(tmp_path)), device=compute_device) as mem:
            if engine_threads is None:
                dsts = _schedule(mem, None, seed=5)
            else:
                with CopyEngine(mem, threads=engine_threads) as engine:
                    dsts = _schedule(mem, engine, seed=5)
                    engine.sync()
                # Side streams exactly when overlapping on CUDA, at most one per worker thread.
                streams = engine.streams.streams if engine.streams is not None else []
                assert (engine.streams is not None) == (compute_device.type == "cuda" and threads > 0)
                assert len(streams) <= threads
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


def test_overlap_off_counts_the_copy_itself_as_waiting(memory: Memory):
    # With threads=0 the caller is blocked for the whole copy, not only for emulated link time: the
    # disk read of overlap off is exactly the time overlap on should hide, so it must show as waiting.
    data = memory.cpu.alloc((8 * MIB,), torch.float32, "host")  # 32 MiB
    data.copy_(torch.arange(8 * MIB, dtype=torch.float32))
    disk = memory.disk.alloc(data.shape, data.dtype, "file")
    gpu = memory.gpu.alloc(data.shape, data.dtype, "dev")
    with CopyEngine(memory, threads=0) as engine:
        start = time.perf_counter()
        engine.submit(disk, None, data, None)
        engine.submit(gpu, None, disk, None).wait()
        elapsed = time.perf_counter() - start
    assert torch.equal(gpu, data)
    assert engine.transfer_wait_s >= 0.9 * elapsed > 0


# ---------------------------------------------------------------- overlap on/off through the executor

def test_executor_overlap_on_equals_off(compute_device: torch.device, tmp_path: Path):
    """Weight prefetch into alternating staging slots (on CUDA: side streams racing the compute that reads
    the other slot) gives bit-identical logits to the synchronous schedule: same kernels, same operands."""
    from runner.model.config import LLAMA_ARCH, ModelConfig
    from runner.offload.executor import Executor, OffloadPolicy
    from runner.model.layers import weight_shapes
    from runner.engines.sampling import SamplingParams
    from runner.model.tokenizer import ByteTokenizer

    cfg = ModelConfig(name="tiny-llama", arch=LLAMA_ARCH, vocab_size=300, hidden_size=128,
                      intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      norm_eps=1e-5, tie_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    weights = {k: 0.3 * torch.randn(s, generator=gen) for k, s in weight_shapes(cfg).items()}
    prompts = [[(5 * i + r) % 290 + 3 for i in range(n)] for r, n in enumerate([12, 7, 15, 9])]
    runs = []
    for overlap in (False, True):
        logits: list[torch.Tensor] = []
        with Executor(cfg, weights, ByteTokenizer(), device=compute_device, gpu_batch_size=2, num_gpu_batches=2,
                      policy=OffloadPolicy(w_gpu_percent=20, w_cpu_percent=50, overlap=overlap),
                      budgets=TierBudgets(offload_dir=str(tmp_path))) as ex:
            ex.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True),
                        observe=lambda i, lg: logits.append(lg.float().cpu()))
            # Bytes moved and peaks must match; timing columns (if the executor reports any) may not.
            runs.append((logits, {k: v for k, v in ex.stats().items() if k.startswith(("bytes_", "peak_"))}))
    (off, off_stats), (on, on_stats) = runs
    assert len(on) == len(off) == 8
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert on_stats == off_stats and on_stats["bytes_gpu_from_cpu"] > 0 and on_stats["bytes_disk_read"] > 0


# ---------------------------------------------------------------- CUDA side streams

@pytest.fixture
def cuda_memory(compute_device: torch.device, tmp_path: Path):
    if compute_device.type != "cuda":
        pytest.skip("needs CUDA: run with ALISA_TEST_DEVICE=cuda (tests/gpu/check.sh)")
    with Memory(TierBudgets(offload_dir=str(tmp_path)), device=compute_device) as mem:
        yield mem


def _sleep_cycles(seconds: float) -> int:
    """torch.cuda._sleep cycles that keep the current stream busy for about `seconds` (clocks vary)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(10 ** 7)
    torch.cuda.synchronize()
    return int(seconds * 10 ** 7 / (time.perf_counter() - start))


BIG = 64 * MIB  # one copy: milliseconds over PCIe, far shorter than the compute stalls below


def test_side_stream_copy_from_pinned_cpu_overlaps_compute(cuda_memory: Memory):
    mem = cuda_memory
    src = mem.cpu.alloc((BIG // 4,), torch.float32, "host")
    dst = mem.gpu.alloc((BIG // 4,), torch.float32, "dev")
    assert src.is_pinned() and dst.is_cuda
    src.copy_(torch.arange(BIG // 4, dtype=torch.float32))
    cycles = _sleep_cycles(0.5)  # calibrated first: it synchronizes the device
    with CopyEngine(mem, threads=2) as engine:
        handle = engine.submit(dst, None, src, None)
        torch.cuda._sleep(cycles)  # compute issued after the submit: the copy need not wait for it
        handle.wait()
        # The copy finished while the compute stream is still busy: it ran on another stream, concurrently.
        assert not torch.cuda.current_stream().query()
        assert handle.done()
        streams = list(engine.streams.streams)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)
    assert mem.moved()["gpu<-cpu"] == BIG and mem.moved()["cpu<-gpu"] == 0
    assert len(streams) == 1 and streams[0] != torch.cuda.current_stream()


@pytest.mark.parametrize("direction", ["gpu<-cpu", "cpu<-gpu"])
def test_copy_waits_for_compute_issued_before_submit(cuda_memory: Memory, direction: str):
    """A copy must see what compute wrote before the submit (read-after-write: offloading fresh KV) and
    must not be overwritten by it (write-after-read: prefetching into a slot compute still uses), and
    wait() blocks for real until then (transfer_wait_s counts it)."""
    mem = cuda_memory
    gpu = mem.gpu.alloc((BIG // 4,), torch.float32, "dev")
    cpu = mem.cpu.alloc((BIG // 4,), torch.float32, "host")
    want = torch.arange(BIG // 4, dtype=torch.float32)
    want_dev = want.to(gpu.device)  # now: a pageable host->device copy would block the host behind the stall
    stall = 0.3
    cycles = _sleep_cycles(stall)  # synchronizes the device, so the stall starts from an idle GPU
    with CopyEngine(mem, threads=2) as engine:
        torch.cuda._sleep(cycles)
        if direction == "gpu<-cpu":
            cpu.copy_(want)
            gpu.fill_(-1.0)  # queued compute write: the copy below must land after it
            handle = engine.submit(gpu, None, cpu, None)
        else:
            gpu.copy_(want_dev)  # queued compute write: the copy below must read it
            handle = engine.submit(cpu, None, gpu, None)
        handle.wait()
        got = gpu.cpu() if direction == "gpu<-cpu" else cpu.clone()  # cpu: read by the host right after wait
        assert engine.transfer_wait_s >= 0.5 * stall
    assert torch.equal(got, want)
    assert mem.moved()[direction] == BIG


def test_emulated_link_holds_side_stream_copies(cuda_memory: Memory):
    gpu = cuda_memory.gpu.alloc((N // 4,), torch.float32, "dev")
    cpu = cuda_memory.cpu.alloc((N // 4,), torch.float32, "host")
    cpu.copy_(torch.arange(N // 4, dtype=torch.float32))
    with CopyEngine(cuda_memory, threads=2, link=LINK) as engine:
        start = time.perf_counter()
        engine.submit(gpu, None, cpu, None).wait()
        elapsed = time.perf_counter() - start
    assert elapsed >= SECONDS * (1 - 1e-9)
    assert torch.equal(gpu.cpu(), cpu)
    assert engine.link_busy_s() == {"gpu<-cpu": pytest.approx(SECONDS), "cpu<-gpu": 0.0}
