"""Scale-out on Ray: one job's dataset sharded over Ray workers, their outputs merged into the files a
single-process run writes (`cluster.backend: ray`, or `run.py JOB.yaml --ray [ADDRESS]`).

Shard i of N is the job with `dataset.shard_index: i, shard_count: N` (it takes the batch windows w with
w % N == i, runner/run_loop.py) written to `<output.dir>/shards/<i>/`, run by `run_job` in a Ray task with
`cluster.threads_per_worker` CPUs (and one GPU when the cluster has GPUs). Batches are formed inside
windows, so a shard's batches are exactly the single-process run's and greedy outputs are the same.

A dead worker's task is retried by Ray (`max_retries`); run_job resumes from the shard's own directory
(state.json), after the last committed batch, without duplicates, so shard directories must be on a
filesystem every worker sees. When every shard is done the driver merges them (streaming, one window in
memory at a time) into `<output.dir>`: generations.jsonl and rejects.jsonl in dataset order,
batches.csv with a `shard` column, report.png, job.yaml, and one throughput.csv row for the whole run.
"""
from __future__ import annotations

import contextlib
import csv
import heapq
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import ray
import yaml

from runner.job import Device, JobSpec, OutputOrder, apply_overrides, job_from_dict
from runner.data.outputs import (COMPUTED_COLUMNS, KV_PHASE_COLUMNS, OFFLOAD_COLUMNS, TIER_PEAK_COLUMNS, append_csv_row,
                                 git_commit, throughput_row)
from runner.data.reports import BATCH_COLUMNS, plot_report
from runner.resume import SHARDS, locked

ROOT = Path(__file__).resolve().parents[1]  # the repository: on workers' PYTHONPATH, so they import runner
MERGED = ("generations.jsonl", "rejects.jsonl", "batches.csv", "report.png")


class ClusterError(ValueError):
    """The Ray run cannot start or a shard failed; the message names the shard and what to do."""


@dataclass(frozen=True)
class Progress:
    """What a shard directory holds finished: prompts, rejected records and committed batches."""
    prompts: int = 0
    rejects: int = 0
    batches: int = 0


@dataclass
class Shard:
    index: int
    job: JobSpec
    before: Progress  # at launch; this run's batches are those numbered from before.batches
    row: dict | None = None  # run_job's row (None: cancelled before it could write one)
    interrupted: bool = False

    @property
    def dir(self) -> Path:
        return self.job.output_dir


# ---------------------------------------------------------------- the driver

def run_on_ray(job: JobSpec, *, sweep_point: str = "", fresh: bool = False) -> dict:
    """Run `job` sharded over the workers of a Ray cluster and merge the shards into `job.output_dir`.

    Joins the running Ray instance if this process has one (tests: `ray.init(num_cpus=2)`), else
    `ray.init(cluster.address)` (None: a fresh local instance) and shuts it down after. Appends one row
    to `job.throughput_csv` and returns it; a job whose shards were all complete already runs nothing and
    returns a "complete" row with no prompts, not written (as run_job does). SIGINT stops every runner
    after its batch in flight; the row then has status "interrupted" and the same command resumes."""
    _check_job(job)
    try:
        job.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClusterError(f"output.dir: cannot create {job.output_dir} ({e.strerror})") from None
    # The driver holds the output dir's lock (the one a single-process run takes) from before Ray starts to
    # after the merge: a second driver would otherwise queue its shards behind ours, merge into the same
    # files, or (--fresh) delete the shard directories under our workers.
    with locked(job.output_dir):
        _check_dir(job, fresh)
        return _run_locked(job, sweep_point=sweep_point, fresh=fresh)


def _run_locked(job: JobSpec, *, sweep_point: str, fresh: bool) -> dict:
    owned = not ray.is_initialized()
    init_started = time.perf_counter()
    if owned:
        ray.init(address=job.cluster.address, include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
    try:
        init_s = time.perf_counter() - init_started
        workers, gpus = _worker_count(job, ray.cluster_resources())
        shards = _prepare(job, workers, fresh)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        started = time.perf_counter()
        _run_shards(job, shards, gpus)
        wall_s = time.perf_counter() - started
    finally:
        if owned:
            ray.shutdown()
    return _merge(job, shards, wall_s=wall_s, init_s=init_s, started_at=started_at, sweep_point=sweep_point)


def _check_job(job: JobSpec) -> None:
    """Refuse, before the output dir is touched, a job the driver cannot run."""
    if job.eval is not None or job.sweep:
        raise ClusterError("cluster: run_on_ray takes one generation job (run.py runs each sweep point apart)")
    if job.dataset.shard_count != 1:
        raise ClusterError("dataset.shard_count: set by the Ray driver for each worker; leave it at 1 with "
                           "cluster.backend: ray")


def _check_dir(job: JobSpec, fresh: bool) -> None:
    """Refuse, before Ray starts, an output dir the Ray run must not write into."""
    single = job.output_dir / "state.json"
    if single.exists() and job.output.resume and not fresh:  # merging over its files would break its resume
        raise ClusterError(f"output.dir: {job.output_dir} holds a single-process run of this job ({single.name}); "
                           "resume it without Ray, or re-run with --fresh to start over on Ray")


def _worker_count(job: JobSpec, resources: dict) -> tuple[int, int]:
    """(runners, GPUs per runner): one per GPU on a GPU cluster, else CPUs // threads_per_worker."""
    cluster = job.cluster
    gpus = int(resources.get("GPU", 0)) if job.hardware.device is not Device.CPU else 0
    if job.hardware.device is Device.CUDA and not gpus:
        raise ClusterError("hardware.device: cuda, but the Ray cluster has no GPU")
    workers = cluster.workers or (gpus if gpus else int(resources.get("CPU", 0)) // cluster.threads_per_worker)
    if workers < 1:
        raise ClusterError(f"cluster.threads_per_worker: {cluster.threads_per_worker} threads per worker, but the "
                           f"Ray cluster has {resources.get('CPU', 0):g} CPUs")
    return workers, min(gpus, 1)


def shard_job(job: JobSpec, index: int, count: int) -> JobSpec:
    """Shard `index` of `count`: its windows of the dataset, its own output dir and CSV, its threads."""
    shard_dir = (job.output_dir / SHARDS / str(index)).absolute()  # workers may start in another directory
    return job_from_dict(apply_overrides(job.to_dict(), {
        "dataset.shard_index": index, "dataset.shard_count": count, "output.dir": str(shard_dir),
        "output.csv": str(shard_dir / "throughput.csv"), "hardware.num_threads": job.cluster.threads_per_worker,
        "cluster": {"backend": "local"}}))


def _prepare(job: JobSpec, workers: int, fresh: bool) -> list[Shard]:
    """The shard jobs, with what each directory held before (resumed); `fresh` or `output.resume: false`
    start over (the shards' own run_job would too, but a retried task must resume, not start over)."""
    root = job.output_dir / SHARDS
    if fresh or not job.output.resume:
        shutil.rmtree(root, ignore_errors=True)
        for name in (*MERGED, "state.json"):
            (job.output_dir / name).unlink(missing_ok=True)
    state = root / "0" / "state.json"
    if state.exists():
        held = json.loads(state.read_text()).get("shard", [0, workers])[1]
        if held != workers:
            raise ClusterError(f"cluster.workers: {root} holds the shards of a {held}-worker run, now {workers}; "
                               f"re-run with cluster.workers: {held} to resume, or with --fresh to start over")
    return [Shard(i, shard_job(job, i, workers), _progress(root / str(i), job.output.resume))
            for i in range(workers)]


def _progress(shard_dir: Path, resumable: bool) -> Progress:
    """A shard's committed progress (its state.json); a run without resume keeps no state: its files count."""
    state = shard_dir / "state.json"
    if resumable and state.exists():
        raw = json.loads(state.read_text())
        return Progress(prompts=raw["prompts"], rejects=raw["rejects"], batches=raw["batches"])
    rows = _read_batches(shard_dir / "batches.csv")
    rejects = shard_dir / "rejects.jsonl"
    return Progress(prompts=sum(int(r["prompts"]) for r in rows), batches=len(rows),
                    rejects=len(rejects.read_text().splitlines()) if rejects.exists() else 0)


@ray.remote
def _run_shard(job: dict, cwd: str) -> dict:
    """One shard, in a Ray worker: run_job into the shard's own dir (resuming what an earlier try finished)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative dataset / model paths of the job resolve as on the driver
    from runner.run_job import run_job
    return run_job(job_from_dict(job), progress=False)


def _run_shards(job: JobSpec, shards: list[Shard], gpus: int) -> None:
    """Submit every shard and wait; the first failing shard cancels the rest. Ctrl-C cancels them all:
    Ray raises KeyboardInterrupt in each runner, which abandons its batch in flight and keeps the rest."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    pending = {_run_shard.options(name=f"shard-{s.index}", num_cpus=job.cluster.threads_per_worker, num_gpus=gpus,
                                  max_retries=job.cluster.max_retries, runtime_env={"env_vars": env})
               .remote(s.job.to_dict(), os.getcwd()): s for s in shards}
    try:
        while pending:
            # A timeout, so that the main thread returns to Python and sees Ctrl-C at once.
            for ref in ray.wait(list(pending), num_returns=1, timeout=0.5)[0]:
                _collect(pending.pop(ref), ref)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        for ref, shard in pending.items():
            with contextlib.suppress(ClusterError, ray.exceptions.TaskCancelledError):
                _collect(shard, ref)
            shard.interrupted = shard.interrupted or shard.row is None
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _collect(shard: Shard, ref: ray.ObjectRef) -> None:
    """The shard's row; an error in it (a job error, a worker dead max_retries + 1 times) as a ClusterError."""
    try:
        shard.row = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        from runner.run_job import Interrupted  # torch: only where a runner raised (its cause unpickled it anyway)
        if isinstance(e.cause, Interrupted):  # SIGINT / SIGTERM reached the runner: it stopped after a batch
            shard.row, shard.interrupted = e.cause.row, True
            return
        raise ClusterError(f"shard {shard.index} ({shard.dir}): {e.cause if e.cause is not None else e}") from None
    except ray.exceptions.TaskCancelledError:
        raise
    except ray.exceptions.RayError as e:
        raise ClusterError(f"shard {shard.index} ({shard.dir}): {type(e).__name__}: {str(e).splitlines()[0]}; what "
                           "it finished is kept there: the same command resumes") from None


# ---------------------------------------------------------------- merging

def _merge(job: JobSpec, shards: list[Shard], *, wall_s: float, init_s: float, started_at: str,
           sweep_point: str) -> dict:
    """Merge the shards' outputs into `job.output_dir` (each file atomically) and append the run's row."""
    out = job.output_dir
    window = _window(job, shards)
    merge_jsonl([s.dir / "generations.jsonl" for s in shards], out / "generations.jsonl", window, job.output.order)
    merge_jsonl([s.dir / "rejects.jsonl" for s in shards], out / "rejects.jsonl", window, OutputOrder.DATASET)
    batches = merge_batches([s.dir / "batches.csv" for s in shards], out / "batches.csv")
    if batches:
        plot_report(out / "batches.csv", out / "report.png", f"{job.name} on Ray, {len(shards)} workers: "
                    f"{job.model.name or job.model.path}, {job.kv.label()}, batch {job.batch.gpu_batch_size}")
    _write_atomic(out / "job.yaml", yaml.safe_dump(job.to_dict(), sort_keys=False))
    row = merged_row(job, shards, batches, wall_s=wall_s, init_s=init_s, started_at=started_at,
                     sweep_point=sweep_point)
    if row["num_prompts"] or row["status"] != "complete" or not row["resumed_prompts"]:
        append_csv_row(job.throughput_csv, row)  # an already complete job ran nothing: no row, as run_job
    return row


def _window(job: JobSpec, shards: list[Shard]) -> int:
    """Records per batch window: what the shards recorded (offload: auto may have picked the batch), else
    what run_job derives from the job."""
    for s in shards:
        state = s.dir / "state.json"
        if state.exists():
            return int(json.loads(state.read_text())["window"])
    step = job.batch.gpu_batch_size * (job.batch.num_gpu_batches if job.offload is not None else 1)
    return job.dataset.bucket or step


def committed_lines(path: Path) -> Iterator[str]:
    """The whole lines of a shard's output file up to the length its state.json committed: a runner that is
    still stopping (Ctrl-C) may be appending past it. Without a state (output.resume: false), every line."""
    state = path.parent / "state.json"
    limit = json.loads(state.read_text())["lengths"].get(path.name) if state.exists() else None
    if not path.exists():
        return
    read = 0
    with path.open("rb") as f:
        for raw in f:
            read += len(raw)
            if (limit is not None and read > limit) or not raw.endswith(b"\n"):
                return
            yield raw.decode("utf-8")


def _indexed(path: Path) -> Iterator[tuple[int, str]]:
    for line in committed_lines(path):
        yield json.loads(line)["index"], line


def merge_jsonl(sources: list[Path], dest: Path, window: int, order: OutputOrder) -> int:
    """Merge shard files of records keyed by `index` into `dest`; returns the line count. Each window lies
    in one shard, whose file holds its windows in order: merge the streams by window, then (dataset order)
    sort each window's records by index, holding one window in memory; completion order keeps the shard's
    order inside a window (length-sorted with dataset.bucket)."""
    merged = heapq.merge(*(_indexed(p) for p in sources), key=lambda item: item[0] // window)
    count = 0
    with _atomic(dest) as f:
        for _, group in itertools.groupby(merged, key=lambda item: item[0] // window):
            items = sorted(group) if order is OutputOrder.DATASET else list(group)
            f.writelines(line for _, line in items)
            count += len(items)
    return count


def _read_batches(path: Path) -> list[dict]:
    return list(csv.DictReader(committed_lines(path)))


def merge_batches(sources: list[Path], dest: Path) -> list[dict]:
    """All shards' batches.csv rows with a `shard` column, by each shard's elapsed time; returns the rows."""
    rows = [{**r, "shard": i} for i, p in enumerate(sources) for r in _read_batches(p)]
    rows.sort(key=lambda r: float(r["elapsed_s"] or 0))
    with _atomic(dest) as f:
        writer = csv.DictWriter(f, fieldnames=[*BATCH_COLUMNS, "shard"], restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator:
    """A file written beside `dest` and renamed over it: a crash leaves the old file or the new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _write_atomic(dest: Path, text: str) -> None:
    with _atomic(dest) as f:
        f.write(text)


# ---------------------------------------------------------------- the run's row

# Per-process peaks: the largest shard's. Link settings and predictions: a shard's (the prediction is for
# one runner's plan). Everything else numeric in the offload and kv timing columns: summed over shards.
_PEAKS = {"peak_gpu_bytes", "peak_cpu_bytes", "kv_peak_bytes", "kv_bytes_per_token", *TIER_PEAK_COLUMNS}
_SUMMED = ({c for c in OFFLOAD_COLUMNS if c not in _PEAKS and c not in ("link_gbps", "link_emulated")}
           | set(KV_PHASE_COLUMNS))


def merged_row(job: JobSpec, shards: list[Shard], batches: list[dict], *, wall_s: float, init_s: float,
               started_at: str, sweep_point: str) -> dict:
    """One throughput row for the Ray run. Prompts and tokens: every shard's batches of this run (a retried
    shard's killed try included: its committed batches stay in its batches.csv). Latency: the Ray run's
    wall clock from submitting the shards to the last one done (worker start, model loads and warm-ups
    included), because the throughput a user gets is tokens / wall time; it is split into prefill and
    decode in the proportion of the shards' summed busy seconds, which `notes` gives as well."""
    mine = [r for r in batches if int(r["batch"]) >= shards[int(r["shard"])].before.batches]
    prefill_busy = sum(float(r["prefill_s"]) for r in mine)
    decode_busy = sum(float(r["decode_s"]) for r in mine)
    busy = prefill_busy + decode_busy
    after = [_progress(s.dir, job.output.resume) for s in shards]
    # Shards that ran (not complete already); a cancelled one wrote its row to its own CSV, not back to us.
    rows = [r for r in (s.row or (_last_row(s.dir / "throughput.csv") if s.interrupted else None) for s in shards)
            if r and r.get("model")]
    fields = {"engine": job.engine.value, "model": job.model.name, "kv_policy": job.kv.policy,
              "gpu_batch_size": job.batch.gpu_batch_size, "num_gpu_batches": job.batch.num_gpu_batches,
              **_shard_columns(rows)}
    fields.update(
        job=job.name, started_at=started_at, git_commit=git_commit(), sweep_point=sweep_point,
        num_threads=job.cluster.threads_per_worker, workers=len(shards),
        status="interrupted" if any(s.interrupted for s in shards) else "complete",
        resumed_prompts=sum(s.before.prompts for s in shards),
        rejected_prompts=sum(a.rejects - s.before.rejects for a, s in zip(after, shards)),
        notes=f"ray: {len(shards)} workers x {job.cluster.threads_per_worker} threads; wall {wall_s:.2f} s "
              f"(+ {init_s:.2f} s ray.init); shards busy {busy:.2f} s (prefill {prefill_busy:.2f} + decode "
              f"{decode_busy:.2f})")
    share = prefill_busy / busy if busy else 0.0
    return throughput_row(
        prefill_latency_s=wall_s * share if busy else 0.0, decode_latency_s=wall_s * (1 - share) if busy else 0.0,
        num_prompts=sum(int(r["prompts"]) for r in mine), prompt_tokens=sum(int(r["prompt_tokens"]) for r in mine),
        generated_tokens=sum(int(r["generated_tokens"]) for r in mine), **fields)


def _last_row(path: Path) -> dict | None:
    """The last row of a shard's throughput.csv, numbers as numbers."""
    rows = list(csv.DictReader(committed_lines(path)))
    return {k: _number(v) for k, v in rows[-1].items() if v != ""} if rows else None


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _shard_columns(rows: list[dict]) -> dict:
    """The descriptive columns of the shards' rows (the first shard's), peaks maxed, counters summed."""
    if not rows:
        return {}
    derived = COMPUTED_COLUMNS | {"resumed_prompts", "rejected_prompts", "status", "workers", "notes", "num_threads"}
    out = {k: v for k, v in rows[0].items() if k not in derived}
    for column in _PEAKS | _SUMMED:
        values = [r[column] for r in rows if isinstance(r.get(column), (int, float)) and r[column] == r[column]]
        if values:
            out[column] = max(values) if column in _PEAKS else round(sum(values), 6)
    return out
