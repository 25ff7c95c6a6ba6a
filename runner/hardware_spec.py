"""The job's `hardware` section: the device, CPU threads and memory, and for jobs with an `offload`
section the block executor's tier budgets, disk-tier directory and host <-> gpu link (`link`)."""
from __future__ import annotations

import dataclasses
import enum

from runner.spec import _at_least, _bad, _Spec


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinkSpec(_Spec):
    """`hardware.link`: the host <-> gpu link's bandwidth, stated in the CSV, optionally emulated."""
    _section = "hardware.link"
    gbps: float  # GB/s (10**9 bytes per second) per direction
    # true: the copy engine holds each gpu<->cpu copy for bytes / bandwidth (runner.memory.copy_engine.LinkEmulation),
    # so a CPU-only machine pays a slow link's time; false: the figure is only recorded (e.g. a real GPU's link).
    emulate: bool

    def _validate(self) -> None:
        if not self.gbps > 0:
            raise _bad("hardware.link.gbps", f"must be > 0, got {self.gbps:g}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HardwareSpec(_Spec):
    _section = "hardware"
    _retired = {f"{name}_gb": f"renamed hardware.{name}_gib (GiB, 2**30 bytes)"
                for name in ("memory", "gpu", "cpu", "disk")}
    device: Device = Device.AUTO
    num_threads: int | None = None  # torch CPU threads; None keeps torch's default
    # Memory (GiB, 2**30 bytes) the run may use for weights + KV cache; None = what the device has free.
    memory_gib: float | None = None
    # Tier budgets (GiB) of the block executor (jobs with an `offload` section); None = unlimited.
    gpu_gib: float | None = None
    cpu_gib: float | None = None
    disk_gib: float | None = None
    offload_dir: str = "offload/"  # disk-tier files go in a fresh run-* directory here, removed after the run
    # false: disk-tier files leave the OS page cache after every write and read, so each read comes from
    # the device; true (the OS default) lets spare RAM serve "disk" reads at memory speed.
    disk_page_cache: bool = True
    link: LinkSpec | None = None  # with `offload`: the host <-> gpu link (see LinkSpec)
    # A hardware profile (shipped name such as `t4-16g`, or a YAML path; runner.plan.hardware) for the
    # cost model and plan search (`--plan`, `offload: auto`); tier budgets left unset come from it.
    profile: str | None = None

    def _validate(self) -> None:
        _at_least(self, "num_threads", 1)
        if self.profile is not None:
            from runner.plan.hardware import load_profile
            load_profile(self.profile)  # a missing or malformed profile fails when the job loads
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise _bad("hardware.memory_gib", f"must be > 0, got {self.memory_gib}")
        for name in ("gpu_gib", "cpu_gib", "disk_gib"):
            value = self.values()[name]
            if value is not None and value < 0:
                raise _bad(f"hardware.{name}", f"must be >= 0 (or omitted: unlimited), got {value:g}")
