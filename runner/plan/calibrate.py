"""Measure this machine into a `HardwareProfile` (`python run.py calibrate`).

What is measured, through the runner's own code paths where it has one:
- copies per link direction: `runner.memory.tiers.copy` between the cpu pool and the gpu pool (pinned
  host <-> device on CUDA; on a CPU device the "gpu" tier is host memory, so a host-to-host copy, as
  the block executor does there), and to and from a disk-tier file under the offload directory with
  the page cache dropped after every write and read (`DiskPool(page_cache=False)`: writes are synced);
- compute (`runner.plan.measure`): GEMM, matrix-vector over a large weight (memory bandwidth),
  attention at decode and prefill shapes, phase III recomputation; on CUDA the `cpu_*` figures are
  measured on the CPU in float32, on a CPU device they equal the `gpu_*` ones (one processor);
- fixed costs: decode steps of tiny models (per layer, per step, sparse selection) and the round trip
  of one tiny copy through the copy engine (`overhead_us.transfer`);
- capacities: RAM (MemTotal), the CUDA device's memory, free space of the offload directory's
  filesystem. On a CPU device the gpu and cpu tiers both report the same RAM: they share it.

Each figure is the median of a few repeats after a warm-up. Torch's thread count is the caller's.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import socket
import statistics
import time

import torch

from runner.plan import measure as C
from runner.plan.measure import MIB, Row, row
from runner.memory.copy_engine import CopyEngine
from runner.plan.hardware import Bandwidth, Compute, HardwareProfile, Overheads, TierMemory
from runner.memory.tiers import Memory, TierBudgets, copy
from runner.units import bytes_to_gib, format_gib

_CPU = torch.device("cpu")
DISK_TENSOR_MIB = 16  # disk measurements move tensors of this size (see _disk_rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sizes:
    """How big each measurement is: large enough to reach sustained rates, small enough to finish the
    whole calibration well under two minutes on a 2-core machine (`quick`: a few seconds, for tests)."""
    copy_mib: int
    disk_mib: int
    matmul_n: int
    projection_mib: int
    decode: tuple[tuple[int, int, int, int], ...]  # attention (batch, heads, cached len, head dim)
    prefill: tuple[tuple[int, int, int, int], ...]  # attention (batch, heads, prompt len, head dim)
    recompute: tuple[int, int, int]  # hidden, stored rows, recomputed rows
    repeats: int
    layers: int  # layers of the bigger tiny model (fixed-cost fit)
    steps: int  # decode steps per tiny-model run


QUICK = Sizes(copy_mib=8, disk_mib=4, matmul_n=256, projection_mib=8, decode=((1, 4, 256, 64),),
              prefill=((1, 4, 128, 64),), recompute=(256, 1024, 32), repeats=2, layers=3, steps=6)
CPU_FULL = Sizes(copy_mib=512, disk_mib=1024, matmul_n=2048, projection_mib=64,
                 decode=((8, 16, 1024, 64), (32, 32, 512, 128), (64, 12, 2048, 64)),
                 prefill=((1, 16, 512, 64), (4, 32, 512, 128)), recompute=(1024, 16384, 256), repeats=7,
                 layers=8, steps=40)
CUDA_FULL = Sizes(copy_mib=1024, disk_mib=1024, matmul_n=8192, projection_mib=1024,
                  decode=((32, 32, 2048, 128), (64, 56, 640, 128), (64, 40, 4096, 128)),
                  prefill=((8, 32, 512, 128), (4, 56, 2048, 128)), recompute=(4096, 65536, 2048), repeats=5,
                  layers=8, steps=30)


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    if quick:
        return QUICK
    return CUDA_FULL if device.type == "cuda" else CPU_FULL


def calibrate(*, device: torch.device, offload_dir: str, quick: bool = False,
              name: str = "calibrated") -> tuple[HardwareProfile, list[Row]]:
    """Measure this machine; returns the profile and one row per measurement (see `runner.plan.measure`)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device} is not cpu or cuda")
    if not os.path.isdir(offload_dir):
        raise ValueError(f"offload dir {offload_dir}: no such directory (create it, or pass another)")
    sizes, host = sizes_for(device, quick), sizes_for(_CPU, quick)
    rows = _memory_rows(device, offload_dir)
    with Memory(TierBudgets(offload_dir=offload_dir, disk_page_cache=False), device) as mem:
        rows += _link_rows(mem, sizes) + _disk_rows(mem, sizes) + _transfer_rows(mem)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows += _compute_rows(device, dtype, sizes, "gpu")
    if device.type == "cuda":
        rows += _compute_rows(_CPU, torch.float32, host, "cpu")
    rows += C.overheads(device, dtype, sizes.layers, sizes.steps, sizes.repeats)
    return _profile(name, rows, device), rows


def _compute_rows(device: torch.device, dtype: torch.dtype, s: Sizes, side: str) -> list[Row]:
    rows = C.matmul(device, dtype, s.matmul_n, s.repeats, f"tflops.{side}_matmul")
    rows += C.projection(device, dtype, s.projection_mib, s.repeats, f"bandwidth_gbps.{side}_memory")
    if side == "gpu" and device.type == "cpu":  # the all-resident path's packed weights (kernels.pack)
        rows += C.projection(device, dtype, s.projection_mib, s.repeats, "bandwidth_gbps.packed_weights",
                             packed=True)
    rows += C.attention(device, dtype, s.decode, s.prefill, s.repeats, f"tflops.{side}_attention")
    if side == "gpu":  # recomputation runs where the kept inputs are: on the compute device
        rows += C.recompute(device, dtype, *s.recompute, s.repeats, "tflops.gpu_recompute")
    return rows


def _link_rows(mem: Memory, s: Sizes) -> list[Row]:
    """gpu <- cpu and cpu <- gpu through `runner.memory.tiers.copy`, one large contiguous tensor."""
    nbytes = s.copy_mib * MIB
    host = mem.cpu.alloc((nbytes,), torch.uint8, "calibration host buffer")
    dev = mem.gpu.alloc((nbytes,), torch.uint8, "calibration device buffer")
    host.fill_(1)  # touch every page: first-touch faults are not link time
    dev.fill_(2)
    where = "pinned host <-> cuda" if mem.device.type == "cuda" else "host buffer -> host buffer (gpu tier is the CPU)"
    rows = []
    for field, dst, src in (("gpu_from_cpu", dev, host), ("cpu_from_gpu", host, dev)):
        sec = C.median_seconds(lambda: copy(dst, None, src, None, mem), mem.device, repeats=s.repeats)
        rows.append(row(f"copy {field}", f"bandwidth_gbps.{field}", f"{s.copy_mib} MiB, {where}", sec,
                        nbytes / sec / 1e9, "GB/s"))
    mem.cpu.free(host)
    mem.gpu.free(dev)
    return rows


def _disk_rows(mem: Memory, s: Sizes) -> list[Row]:
    """Synced writes of fresh disk-tier tensors, then reads of them, the page cache dropped after each.
    Tensors of `DISK_TENSOR_MIB` (a layer matrix), not one big file: the executor reads and writes
    tensor by tensor, and here 16 MiB reads stream at ~half the rate of one 1 GiB read."""
    chunk = min(DISK_TENSOR_MIB, s.disk_mib) * MIB
    count = max(1, s.disk_mib * MIB // chunk)
    host = [mem.cpu.alloc((chunk,), torch.uint8, f"calibration disk buffer {i}") for i in range(count)]
    for h in host:
        h.random_(0, 256)  # incompressible, in case the filesystem compresses
    writes, files = [], []
    for _ in range(s.repeats + 1):  # the first of each is a warm-up
        for f in files:
            mem.disk.free(f)
        # Fresh (sparse) files each time: rewriting evicted pages of a mapped file would read them first.
        files = [mem.disk.alloc((chunk,), torch.uint8, f"calibration file {i}") for i in range(count)]
        start = time.perf_counter()
        for f, h in zip(files, host):
            copy(f, None, h, None, mem)  # ends with fsync and eviction (page_cache=False)
        writes.append(time.perf_counter() - start)

    def read() -> None:
        for f, h in zip(files, host):
            copy(h, None, f, None, mem)
    seconds = C.median_seconds(read, _CPU, repeats=s.repeats)
    for f in files:
        mem.disk.free(f)
    for h in host:
        mem.cpu.free(h)
    write, nbytes = statistics.median(writes[1:]), chunk * count
    where = f"{count} tensors of {chunk // MIB} MiB in {mem.disk.root}, page cache dropped"
    return [row("disk write (synced)", "bandwidth_gbps.disk_from_cpu", where, write, nbytes / write / 1e9, "GB/s"),
            row("disk read", "bandwidth_gbps.cpu_from_disk", where, seconds, nbytes / seconds / 1e9, "GB/s")]


def _transfer_rows(mem: Memory) -> list[Row]:
    """Round trip of a 1 KiB copy through the copy engine (submit to a worker thread, wait): the fixed
    cost each transfer adds whatever its size."""
    src = mem.cpu.alloc((1024,), torch.uint8, "calibration tiny source")
    dst = mem.gpu.alloc((1024,), torch.uint8, "calibration tiny destination")
    with CopyEngine(mem, threads=2) as engine:
        sec = C.median_seconds(lambda: engine.submit(dst, None, src, None).wait(), mem.device, repeats=200, warmup=20)
    mem.cpu.free(src)
    mem.gpu.free(dst)
    return [row("tiny copy latency", "overhead_us.transfer", "1 KiB gpu <- cpu via CopyEngine (2 threads)", sec,
                sec * 1e6, "us")]


def _memory_rows(device: torch.device, offload_dir: str) -> list[Row]:
    ram = _ram_bytes()
    gpu, where = (torch.cuda.mem_get_info(device)[1], f"{torch.cuda.get_device_name(device)} total") \
        if device.type == "cuda" else (ram, "RAM: the gpu tier is the CPU, sharing RAM with the cpu tier")
    disk = shutil.disk_usage(offload_dir).free
    return [row("gpu memory", "memory_gib.gpu", where, None, bytes_to_gib(gpu), "GiB"),
            row("cpu memory", "memory_gib.cpu", "MemTotal of /proc/meminfo", None, bytes_to_gib(ram), "GiB"),
            row("disk space", "memory_gib.disk", f"free in {os.path.abspath(offload_dir)}", None, bytes_to_gib(disk),
                "GiB")]


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _profile(name: str, rows: list[Row], device: torch.device) -> HardwareProfile:
    figures = {r["field"]: r["value"] for r in rows if r["field"]}
    if device.type == "cpu":  # one processor is both sides
        for gpu_key, cpu_key in (("tflops.gpu_matmul", "tflops.cpu_matmul"),
                                 ("tflops.gpu_attention", "tflops.cpu_attention"),
                                 ("bandwidth_gbps.gpu_memory", "bandwidth_gbps.cpu_memory")):
            figures[cpu_key] = figures[gpu_key]

    def section(prefix: str) -> dict[str, float]:
        return {k.split(".", 1)[1]: v for k, v in figures.items() if k.startswith(prefix + ".")}

    return HardwareProfile(name=name, memory_gib=TierMemory(**section("memory_gib")),
                           bandwidth_gbps=Bandwidth(**section("bandwidth_gbps")), tflops=Compute(**section("tflops")),
                           overhead_us=Overheads(**section("overhead_us")), accelerator=device.type == "cuda")


def describe_machine(device: torch.device) -> str:
    """One line: host, CPU model and cores, torch threads, RAM, and the CUDA device if used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = (f"{socket.gethostname()}: {cpu}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}, {format_gib(_ram_bytes(), 1)} RAM")
    if torch.device(device).type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text
