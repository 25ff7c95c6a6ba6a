"""Measure this machine into a `HardwareProfile` (`python run.py calibrate`).

What is measured, through the runner's own code paths where it has one:
- copies per link direction: `runner.memory.tiers.copy` between the cpu pool and the gpu pool (pinned
  host <-> device on CUDA; on a CPU device the "gpu" tier is host memory, so a host-to-host copy, as
  the block executor does there), and to and from a disk-tier file under the offload directory with
  the page cache dropped after every write and read (`DiskPool(page_cache=False)`: writes are synced);
- compute (`runner.plan.measure`): GEMM, matrix-vector over a large weight (memory bandwidth),
  group-wise quantize and dequantize of KV and weights (`quant_ns`, runner/kv/quant.py),
  attention at decode and prefill shapes, phase III recomputation; on CUDA the `cpu_*` figures are
  measured on the CPU in float32, on a CPU device they equal the `gpu_*` ones (one processor);
- fixed costs: decode steps of tiny models (per layer, per step, sparse selection) and the round trip
  of one tiny copy through the copy engine (`overhead_us.transfer`);
- capacities: RAM (MemTotal), the CUDA device's memory, free space of the offload directory's
  filesystem. On a CPU device the gpu and cpu tiers both report the same RAM: they share it.

Each figure is the median of a few repeats after a warm-up. Torch's thread count is the caller's.

What makes the figures trustworthy (issue 20: a loaded machine once gave a profile 1,000-5,000x off, and
nothing said so): the whole calibration runs under a wall-time limit (`Deadline`, checked before every
repeat); a measurement whose repeats spread beyond `MAX_SPREAD` is measured once more; and the finished
profile is refused (`CalibrationError`, nothing returned) when a figure lies outside its plausible range
(`PLAUSIBLE`) or its repeats still spread too far.
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
from runner.plan.measure import MAX_SPREAD, MIB, CalibrationError, Deadline, Row, Timer, row
from runner.memory.copy_engine import CopyEngine
from runner.model import kernels
from runner.memory.pools import DiskTensor
from runner.plan.hardware import Bandwidth, Compute, HardwareProfile, Overheads, QuantCosts, TierMemory
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
    quant_mib: int  # tensor quantized and dequantized (quant_ns)
    repeats: int
    layers: int  # layers of the bigger tiny model (fixed-cost fit)
    steps: int  # decode steps per tiny-model run


QUICK = Sizes(copy_mib=8, disk_mib=4, matmul_n=256, projection_mib=8, decode=((1, 4, 256, 64),),
              prefill=((1, 4, 128, 64),), recompute=(256, 1024, 32), quant_mib=2, repeats=2, layers=3, steps=6)
CPU_FULL = Sizes(copy_mib=512, disk_mib=1024, matmul_n=2048, projection_mib=64,
                 decode=((8, 16, 1024, 64), (32, 32, 512, 128), (64, 12, 2048, 64)),
                 prefill=((1, 16, 512, 64), (4, 32, 512, 128)), recompute=(1024, 16384, 256), quant_mib=32, repeats=7,
                 layers=8, steps=40)
CUDA_FULL = Sizes(copy_mib=1024, disk_mib=1024, matmul_n=8192, projection_mib=1024,
                  decode=((32, 32, 2048, 128), (64, 56, 640, 128), (64, 40, 4096, 128)),
                  prefill=((8, 32, 512, 128), (4, 56, 2048, 128)), recompute=(4096, 65536, 2048), quant_mib=512, repeats=5,
                  layers=8, steps=30)


# Default wall-time limits: a full calibration of this 2-core machine takes ~30 s when quiet and a quick
# one a few seconds; 4x that is room for a slower disk or a busier moment, and far short of issue 20's 882 s.
MAX_SECONDS_FULL = 120.0
MAX_SECONDS_QUICK = 20.0


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    if quick:
        return QUICK
    return CUDA_FULL if device.type == "cuda" else CPU_FULL


def calibrate(*, device: torch.device, offload_dir: str, quick: bool = False, name: str = "calibrated",
              max_seconds: float | None = None) -> tuple[HardwareProfile, list[Row]]:
    """Measure this machine; returns the profile and one row per measurement (see `runner.plan.measure`).

    Raises `CalibrationError` (one line) when `max_seconds` of wall time pass (default MAX_SECONDS_FULL,
    or MAX_SECONDS_QUICK when `quick`) or the figures fail `check_figures`."""
    device = torch.device(device)
    limit = max_seconds if max_seconds is not None else MAX_SECONDS_QUICK if quick else MAX_SECONDS_FULL
    if not limit > 0:
        raise ValueError(f"max_seconds: must be > 0, got {limit:g}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device} is not cpu or cuda")
    if not os.path.isdir(offload_dir):
        raise ValueError(f"offload dir {offload_dir}: no such directory (create it, or pass another)")
    sizes, host = sizes_for(device, quick), sizes_for(_CPU, quick)
    deadline = Deadline(limit_s=limit)
    timer, host_timer = Timer(repeats=sizes.repeats, deadline=deadline), Timer(repeats=host.repeats, deadline=deadline)
    rows = _memory_rows(device, offload_dir)
    with Memory(TierBudgets(offload_dir=offload_dir, disk_page_cache=False), device) as mem:
        rows += _link_rows(mem, sizes, timer) + _disk_rows(mem, sizes, timer) + _transfer_rows(mem, timer)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows += _compute_rows(device, dtype, sizes, timer, "gpu")
    if device.type == "cpu" and kernels.native_bf16():  # `dtype: auto` runs bf16 here
        rows += C.matmul(device, torch.bfloat16, sizes.matmul_n, timer, "tflops.gpu_matmul_bf16")
    if device.type == "cuda":
        rows += _compute_rows(_CPU, torch.float32, host, host_timer, "cpu")
    rows += C.overheads(device, dtype, sizes.layers, sizes.steps, timer)
    profile = _profile(name, rows, device)
    check_figures(profile, rows)
    return profile, rows


def _compute_rows(device: torch.device, dtype: torch.dtype, s: Sizes, timer: Timer, side: str) -> list[Row]:
    rows = C.matmul(device, dtype, s.matmul_n, timer, f"tflops.{side}_matmul")
    rows += C.projection(device, dtype, s.projection_mib, timer, f"bandwidth_gbps.{side}_memory")
    if side == "gpu" and device.type == "cpu":  # the all-resident path's packed weights (kernels.pack)
        rows += C.projection(device, dtype, s.projection_mib, timer, "bandwidth_gbps.packed_weights", packed=True)
    rows += C.attention(device, dtype, s.decode, s.prefill, timer, f"tflops.{side}_attention")
    if side == "gpu":  # recomputation runs where the kept inputs are: on the compute device
        rows += C.recompute(device, dtype, *s.recompute, timer, "tflops.gpu_recompute")
        rows += C.quantization(device, dtype, s.quant_mib, timer)  # stored KV and weights convert where they compute
    return rows


def _link_rows(mem: Memory, s: Sizes, timer: Timer) -> list[Row]:
    """gpu <- cpu and cpu <- gpu through `runner.memory.tiers.copy`, one large contiguous tensor."""
    nbytes = s.copy_mib * MIB
    host = mem.cpu.alloc((nbytes,), torch.uint8, "calibration host buffer")
    dev = mem.gpu.alloc((nbytes,), torch.uint8, "calibration device buffer")
    host.fill_(1)  # touch every page: first-touch faults are not link time
    dev.fill_(2)
    where = "pinned host <-> cuda" if mem.device.type == "cuda" else "host buffer -> host buffer (gpu tier is the CPU)"
    rows = []
    for field, dst, src in (("gpu_from_cpu", dev, host), ("cpu_from_gpu", host, dev)):
        t = timer.time(lambda: copy(dst, None, src, None, mem), mem.device, f"copy {field}")
        rows.append(row(f"copy {field}", f"bandwidth_gbps.{field}", f"{s.copy_mib} MiB, {where}", t.seconds,
                        nbytes / t.seconds / 1e9, "GB/s", spread=t.spread))
    mem.cpu.free(host)
    mem.gpu.free(dev)
    return rows


def _disk_rows(mem: Memory, s: Sizes, timer: Timer) -> list[Row]:
    """Synced writes of fresh disk-tier tensors, then reads of them, the page cache dropped after each.
    Tensors of `DISK_TENSOR_MIB` (a layer matrix), not one big file: the executor reads and writes
    tensor by tensor, and here 16 MiB reads stream at ~half the rate of one 1 GiB read."""
    chunk = min(DISK_TENSOR_MIB, s.disk_mib) * MIB
    count = max(1, s.disk_mib * MIB // chunk)
    host = [mem.cpu.alloc((chunk,), torch.uint8, f"calibration disk buffer {i}") for i in range(count)]
    for h in host:
        h.random_(0, 256)  # incompressible, in case the filesystem compresses
    files: list[DiskTensor] = []

    def write() -> float:
        for f in files:
            mem.disk.free(f)
        # Fresh (sparse) files each time: rewriting evicted pages of a mapped file would read them first.
        files[:] = [mem.disk.alloc((chunk,), torch.uint8, f"calibration file {i}") for i in range(count)]
        start = time.perf_counter()
        for f, h in zip(files, host):
            copy(f, None, h, None, mem)  # ends with fsync and eviction (page_cache=False)
        return time.perf_counter() - start

    def read() -> None:
        for f, h in zip(files, host):
            copy(h, None, f, None, mem)
    writes = timer.series(write, "disk write (synced)")
    reads = timer.time(read, _CPU, "disk read")
    for f in files:
        mem.disk.free(f)
    for h in host:
        mem.cpu.free(h)
    nbytes = chunk * count
    where = f"{count} tensors of {chunk // MIB} MiB in {mem.disk.root}, page cache dropped"
    return [row("disk write (synced)", "bandwidth_gbps.disk_from_cpu", where, writes.seconds,
                nbytes / writes.seconds / 1e9, "GB/s", spread=writes.spread),
            row("disk read", "bandwidth_gbps.cpu_from_disk", where, reads.seconds, nbytes / reads.seconds / 1e9,
                "GB/s", spread=reads.spread)]


def _transfer_rows(mem: Memory, timer: Timer) -> list[Row]:
    """Round trip of a 1 KiB copy through the copy engine (submit to a worker thread, wait): the fixed
    cost each transfer adds whatever its size. Each repeat is the median of 40 round trips: one trip
    (tens of microseconds) is shorter than the scheduler's noise, so single trips spread far beyond 3x."""
    src = mem.cpu.alloc((1024,), torch.uint8, "calibration tiny source")
    dst = mem.gpu.alloc((1024,), torch.uint8, "calibration tiny destination")
    with CopyEngine(mem, threads=2) as engine:
        def trip() -> float:
            start = time.perf_counter()
            engine.submit(dst, None, src, None).wait()
            C.sync(mem.device)
            return time.perf_counter() - start

        t = timer.series(lambda: statistics.median([trip() for _ in range(40)]), "tiny copy latency", repeats=5)
    mem.cpu.free(src)
    mem.gpu.free(dst)
    return [row("tiny copy latency", "overhead_us.transfer", "1 KiB gpu <- cpu via CopyEngine (2 threads), "
                "5 medians of 40", t.seconds, t.seconds * 1e6, "us", spread=t.spread)]


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
                           quant_ns=QuantCosts(**section("quant_ns")),
                           overhead_us=Overheads(**section("overhead_us")), accelerator=device.type == "cuda",
                           native_bf16=device.type == "cpu" and kernels.native_bf16())


Range = tuple[float, float]
# Plausible range of each measured figure, (low, high), on a CPU device and on a CUDA device: wide enough
# for any real machine from a single-board computer to an H200 host, so a figure outside is a measurement
# gone wrong (issue 20's loaded machine gave 7.8e-5 TFLOP/s for a matmul this machine does at 0.18).
# Capacities (memory_gib) are not here: the OS reports them, nothing is timed, load cannot skew them.
_HOST_COPY: Range = (0.1, 2000.0)  # GB/s, RAM to RAM: 10x under a Raspberry Pi's memcpy; ~2x a Xeon Max's HBM
_PCIE: Range = (0.1, 1000.0)  # GB/s, pinned host <-> device: a PCIe 1.0 x1 riser (0.25) to 2x GH200's NVLink-C2C
_DISK: Range = (0.005, 100.0)  # GB/s, synced, page cache dropped: an SD card (~10 MB/s) to a PCIe 5.0 NVMe array
_CPU_MEMORY: Range = (0.1, 2000.0)  # GB/s, weight streaming: as _HOST_COPY (small sizes may stream from cache)
_GPU_MEMORY: Range = (1.0, 20000.0)  # GB/s: a Jetson's 25 GB/s / 25 to 4x an H200's 4.8 TB/s (L2-resident sizes)
# TFLOP/s fp32 on a CPU: 1e-3 is ~5x under one Raspberry Pi 4 core; 100 is above two 192-core AVX-512 sockets (~74).
_CPU_MATMUL: Range = (1e-3, 100.0)
_CPU_SMALL_OPS: Range = (1e-4, 100.0)  # decode attention and recompute: memory-bound, ~10x under the GEMM rate
# TFLOP/s fp16 on a GPU: a Pascal GeForce runs fp16 at 1/64 rate (~0.03); a B200 does ~2,250 dense.
_GPU_MATMUL: Range = (1e-2, 5000.0)
_GPU_SMALL_OPS: Range = (1e-4, 5000.0)  # tiny decode shapes are launch-bound: ~0.01 on any GPU, 100x margin
# ns per element of group-wise (de)quantization: a few memory passes per element. On a CPU ~1 ns here (2 cores,
# fp32); 1e-3 would be ~100x a 192-core server's streaming rate, 1e3 is a microsecond per element. On a GPU
# ~0.1 ns on a T4 (FlexGen's, fitted), ~0.01 on an H100; 1e-5 is beyond any HBM, 10 is ~100x a T4's.
_CPU_QUANT: Range = (1e-3, 1e3)
_GPU_QUANT: Range = (1e-5, 10.0)
_OVERHEAD: Range = (0.0, 1e5)  # us: a fitted fixed cost may be 0; 0.1 s per layer or step is ~400x this machine's
PLAUSIBLE: dict[str, tuple[Range, Range | None]] = {  # field: (on a CPU device, on a CUDA device)
    "bandwidth_gbps.gpu_from_cpu": (_HOST_COPY, _PCIE),
    "bandwidth_gbps.cpu_from_gpu": (_HOST_COPY, _PCIE),
    "bandwidth_gbps.cpu_from_disk": (_DISK, _DISK),
    "bandwidth_gbps.disk_from_cpu": (_DISK, _DISK),
    "bandwidth_gbps.gpu_memory": (_CPU_MEMORY, _GPU_MEMORY),
    "bandwidth_gbps.cpu_memory": (_CPU_MEMORY, _CPU_MEMORY),
    "bandwidth_gbps.packed_weights": (_CPU_MEMORY, None),  # measured on a CPU device only (0 on CUDA: unused)
    "tflops.gpu_matmul": (_CPU_MATMUL, _GPU_MATMUL),
    "tflops.gpu_attention": (_CPU_SMALL_OPS, _GPU_SMALL_OPS),
    "tflops.gpu_recompute": (_CPU_SMALL_OPS, _GPU_SMALL_OPS),
    "tflops.cpu_matmul": (_CPU_MATMUL, _CPU_MATMUL),
    "tflops.gpu_matmul_bf16": (_CPU_MATMUL, None),  # a CPU with native bf16 only
    "tflops.cpu_attention": (_CPU_SMALL_OPS, _CPU_SMALL_OPS),
    **{f"quant_ns.{name}": (_CPU_QUANT, _GPU_QUANT) for name in (f.name for f in dataclasses.fields(QuantCosts))},
    "overhead_us.layer": ((1.0, 1e5), (1.0, 1e5)),  # a layer is a dozen ops, each at least ~1 us of Python
    "overhead_us.step": (_OVERHEAD, _OVERHEAD),
    "overhead_us.select": (_OVERHEAD, _OVERHEAD),
    "overhead_us.transfer": ((0.1, 1e5), (0.1, 1e5)),  # a thread hand-off takes microseconds
}
_UNITS = {"bandwidth_gbps": "GB/s", "tflops": "TFLOP/s", "quant_ns": "ns/element", "overhead_us": "us"}


def implausible(profile: HardwareProfile, rows: list[Row]) -> list[str]:
    """What is wrong with a calibrated profile, one phrase per figure: outside its `PLAUSIBLE` range, or
    measured from repeats (`rows`' spreads) that spread beyond MAX_SPREAD even when measured again."""
    found, figures = [], profile.to_dict()
    for field, ranges in PLAUSIBLE.items():
        limits = ranges[1] if profile.accelerator else ranges[0]
        section, name = field.split(".")
        value = figures[section][name]
        if limits is not None and value is not None and not limits[0] <= value <= limits[1]:
            unit, device = _UNITS[section], "cuda" if profile.accelerator else "cpu"
            found.append(f"{field} = {value:g} {unit} is outside [{limits[0]:g}, {limits[1]:g}], plausible for a "
                         f"{device} device")
    for r in rows:
        if r["field"] and r["spread"] is not None and r["spread"] > MAX_SPREAD:
            found.append(f"{r['field']} is unstable: its repeats ({r['name']}) spread {r['spread']:g}x, slowest "
                         f"over fastest, above {MAX_SPREAD:g}x, measured twice")
    return found


def check_figures(profile: HardwareProfile, rows: list[Row]) -> None:
    """Raise `CalibrationError` (one line naming every figure at fault) if `implausible` finds anything."""
    found = implausible(profile, rows)
    if found:
        raise CalibrationError(f"calibration refused: {'; '.join(found)}; re-run on a quiet machine")


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
