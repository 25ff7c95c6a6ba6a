"""Hardware profiles: what a machine's tiers hold and how fast it moves and computes, for the cost
model (`runner.plan.cost_model`) and the plan search (`runner.plan.search`).

A profile is a YAML file (`runner/plan/profiles/<name>.yaml`, or any path) read into `HardwareProfile`.
Shipped profiles carry the source of each figure in a comment; `python run.py calibrate` measures
this machine and writes one. Units: memory in GiB (2**30 bytes, as the job's budgets and as GPUs report
their memory), bandwidth in GB/s (10**9 bytes/s, as vendors state it), compute in TFLOP/s, fixed costs in
microseconds.

The `gpu` tier is the compute device. On a CPU-only machine that is the CPU itself: `gpu_*`
figures then describe the CPU and `gpu_from_cpu` is a host memory copy (or an emulated link).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from runner.memory.pools import Tier
from runner.spec import JobError, _bad, _build, _Spec
from runner.units import gib_to_bytes

PROFILE_DIR = Path(__file__).parent / "profiles"


class _Positive(_Spec):
    """A section whose every figure must be > 0 (an optional one may be None: not measured)."""

    def _validate(self) -> None:
        for name, value in self.values().items():
            if value is not None and not value > 0:
                raise _bad(self._key(name), f"must be > 0, got {value:g}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TierMemory(_Positive):
    """Capacity of each tier (GiB)."""
    _section = "memory_gib"
    gpu: float
    cpu: float
    disk: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bandwidth(_Positive):
    """Sustained bandwidth (GB/s) of each transfer stream and of each compute side's memory."""
    _section = "bandwidth_gbps"
    gpu_from_cpu: float  # host -> device, pinned
    cpu_from_gpu: float  # device -> host, pinned
    cpu_from_disk: float  # disk read (page cache off)
    disk_from_cpu: float  # disk write, synced
    gpu_memory: float  # device memory (decode matmuls and attention are bound by it)
    cpu_memory: float  # host memory (cpu_cache_compute attention)
    # CPU only: the weight-read rate of decode matmuls on weights packed once for oneDNN (the
    # all-resident path, runner/model/kernels.py::pack), which skip the per-call reorder; 0 = gpu_memory.
    packed_weights: float = 0.0

    def _validate(self) -> None:
        for name, value in self.values().items():
            optional = name == "packed_weights"
            if not (value >= 0 if optional else value > 0):
                raise _bad(self._key(name), f"must be {'>=' if optional else '>'} 0, got {value:g}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compute(_Positive):
    """Sustained throughput (TFLOP/s) at the operand dtype the runs use (fp16 on GPUs, fp32 on CPUs)."""
    _section = "tflops"
    gpu_matmul: float  # large GEMMs (prefill, big-batch decode)
    gpu_attention: float  # batched QK^T / PV (bmm): small inner dims, far below the GEMM peak
    gpu_recompute: float  # phase III K/V projection of scattered tokens (gather + small GEMM)
    cpu_matmul: float
    cpu_attention: float
    # A CPU with native bf16 dot products (`native_bf16`): large bf16 GEMMs, ~6x fp32 on AVX512-BF16 here.
    # None (not measured): bf16 runs are priced at gpu_matmul.
    gpu_matmul_bf16: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Overheads(_Spec):
    """Fixed costs (microseconds) that no bandwidth or FLOP figure captures: kernel launches and
    Python per layer and per step; they dominate small models and batches."""
    _section = "overhead_us"
    layer: float = 0.0  # per layer per forward (norms, rotary, KV write, launches)
    step: float = 0.0  # per decode step (embedding, logits sampling, loop)
    select: float = 0.0  # per layer per decode step, for a sparse KV policy (scores, top-k, gather)
    transfer: float = 0.0  # per copy issued on a transfer stream (latency)

    def _validate(self) -> None:
        for name, value in self.values().items():
            if value < 0:
                raise _bad(self._key(name), f"must be >= 0, got {value:g}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantCosts(_Positive):
    """Time per element (nanoseconds) of group-wise min/max quantization on the compute device: codes
    from values (`quantize`) and values from codes (`dequantize`) at each bit width a run stores. The
    runner's own code (runner/kv/quant.py) on a calibrated profile; on a shipped GPU profile the engine
    whose runs it predicts (FlexGen's compression.py on t4-16g). Elementwise passes over memory, so
    far slower per element than the bandwidth alone says: FlexGen's unfused 4-bit (de)compression
    makes ~6 passes. Weights are quantized once at load (not timed) and stored only at FlexGen's 4
    bits (compress_weight); host-side figures are absent because no path quantizes on the host while
    an accelerator computes (cpu_cache_compute refuses compressed KV)."""
    _section = "quant_ns"
    weight_dequantize_4: float  # compress_weight: a layer's codes into its staging slot, every step
    kv_quantize_4: float  # new tokens' K and V as they are stored (compress_cache, kv.bits 4)
    kv_dequantize_4: float  # stored K and V back to the compute dtype for attention
    kv_quantize_8: float  # kv.bits 8 (ALISA's INT8)
    kv_dequantize_8: float

    def kv(self, bits: int) -> tuple[float, float]:
        """(quantize, dequantize) ns per element of KV stored at `bits`."""
        return {4: (self.kv_quantize_4, self.kv_dequantize_4), 8: (self.kv_quantize_8, self.kv_dequantize_8)}[bits]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HardwareProfile(_Spec):
    _section = ""
    _retired = {"memory_gb": "renamed memory_gib (GiB, 2**30 bytes; a figure in GB is x 10**9 / 2**30)"}
    name: str
    memory_gib: TierMemory
    bandwidth_gbps: Bandwidth
    tflops: Compute
    quant_ns: QuantCosts
    overhead_us: Overheads = dataclasses.field(default_factory=Overheads)
    # false: the compute device is the CPU itself (no accelerator): `dtype: auto` plans fp32 or bf16 there
    accelerator: bool = True
    # accelerator false: the CPU has native bf16 dot products (AVX512-BF16, AMX), so `dtype: auto` plans
    # bf16, as runs on it do (runner.job.DType.torch_dtype)
    native_bf16: bool = False
    # Share of each tier's capacity a plan may fill (FlexGen's cost model uses 0.8): allocator slack,
    # fragmentation, the CUDA context and the OS.
    usable_fraction: float = 0.9

    def _validate(self) -> None:
        if not 0 < self.usable_fraction <= 1:
            raise _bad("usable_fraction", f"must be in (0, 1], got {self.usable_fraction:g}")

    def budget_bytes(self, tier: Tier) -> float:
        """Bytes a plan may place on `tier`."""
        m = self.memory_gib
        return gib_to_bytes({Tier.GPU: m.gpu, Tier.CPU: m.cpu, Tier.DISK: m.disk}[tier]) * self.usable_fraction


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """A shipped profile's file by name (`t4-16g`), or a YAML path as given."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return Path(name_or_path)
    path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise JobError(f"hardware.profile: unknown profile {name_or_path!r}; shipped: "
                       f"{', '.join(shipped_profiles())} (or a path to a .yaml file)", key="hardware.profile")
    return path


def load_profile(name_or_path: str) -> HardwareProfile:
    """Read a profile; every error is one line naming the file and the key at fault."""
    path = profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise JobError(f"hardware.profile: cannot read {path}: {e.strerror}", key="hardware.profile") from None
    except yaml.YAMLError as e:
        raise JobError(f"hardware.profile: {path} is not valid YAML: {str(e).splitlines()[0]}",
                       key="hardware.profile") from None
    try:
        return _build(HardwareProfile, data)
    except JobError as e:
        raise JobError(f"hardware.profile: {path}: {e}", key="hardware.profile") from None


def dump_profile(profile: HardwareProfile, header: str = "") -> str:
    """YAML text that `load_profile` reads back; `header` lines become comments."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(profile.to_dict(), sort_keys=False)
