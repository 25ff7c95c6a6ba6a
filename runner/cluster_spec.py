"""The job's `cluster` section: run the job in this process, or sharded over the workers of a Ray cluster
(runner/cluster.py). `cluster: ray` is short for `cluster: {backend: ray}`."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from runner.spec import _at_least, _bad, _Spec


class ClusterBackend(str, enum.Enum):
    LOCAL = "local"  # one process on this machine (runner.run_job)
    RAY = "ray"  # the dataset's windows sharded over Ray workers, outputs merged (runner.cluster)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec(_Spec):
    _section = "cluster"
    backend: ClusterBackend = ClusterBackend.LOCAL
    # null: start a Ray instance on this machine; "auto": the cluster `ray start` runs here; "ray://host:10001"
    # (Ray client) or "host:6379". Workers must see the repository, the dataset and output.dir at the same paths.
    address: str | None = None
    # Runners, one shard each; null: one per GPU of the cluster, or without GPUs CPUs // threads_per_worker.
    workers: int | None = None
    threads_per_worker: int = 1  # torch CPU threads of each runner (hardware.num_threads of its shard job)
    # Ray re-runs a shard whose worker process died this many times; the shard resumes from its own directory.
    max_retries: int = 3

    def _validate(self) -> None:
        _at_least(self, "workers", 1)
        _at_least(self, "threads_per_worker", 1)
        _at_least(self, "max_retries", 0)
        if self.backend is ClusterBackend.LOCAL:
            for name in ("address", "workers"):
                if self.values()[name] is not None:
                    raise _bad(f"cluster.{name}", "only used with cluster.backend: ray")

    @property
    def on_ray(self) -> bool:
        return self.backend is ClusterBackend.RAY


def cluster_section(value: Any) -> Any:
    """`cluster: ray` / `cluster: local` as the mapping they stand for; anything else as it is."""
    if isinstance(value, str) and value in {b.value for b in ClusterBackend}:
        return {"backend": value}
    return value
