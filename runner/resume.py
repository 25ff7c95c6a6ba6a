"""Crash-safe, resumable runs: what a run has finished, in `state.json` beside its outputs.

The output files (generations.jsonl, rejects.jsonl, batches.csv) are only ever appended, one batch at a
time, and fsynced; then `state.json` is replaced atomically with their new byte lengths and the dataset
positions now finished. The state is the commit point: a run killed between the two leaves lines past
the recorded lengths, and the next run truncates them away and redoes that batch. So `kill -9` at any
moment loses at most the batch in flight and never duplicates or half-writes a line.

Finished positions (`Prompt.index`, rejected records included) are kept as a frontier (everything
below is finished) plus the few finished positions above it, so the state stays small however long
the dataset: batches finish window by window, so the set above the frontier holds at most a window.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.dataset import Prompt, Reject
from runner.data.outputs import named_errors
from runner.job import JobSpec

STATE_FILE = "state.json"
LOCK_FILE = "run.lock"  # flock'd by the run writing the directory; holds its pid
SHARDS = "shards"  # a Ray run's shard dirs, beside the outputs merged from them (runner/cluster.py)
GENERATIONS, REJECTS, BATCHES = "generations.jsonl", "rejects.jsonl", "batches.csv"
APPENDED = (GENERATIONS, REJECTS, BATCHES)  # the files whose committed length the state records
_VERSION = 1


class ResumeError(ValueError):
    """The output directory holds a run this job cannot continue; the message says why and what to do."""


def fingerprint(job: JobSpec) -> dict[str, Any]:
    """The job fields that decide a prompt's output, flattened to dotted keys: resuming under any other
    value would mix two jobs' outputs in one file. Hardware, outputs, the offload placement and
    `dataset.limit` are left out: they change where and how much runs, not what each prompt gets."""
    d = job.to_dict()
    fp = {"engine": d["engine"]}
    for section in ("model", "generation", "kv", "batch"):
        fp.update({f"{section}.{k}": v for k, v in (d.get(section) or {}).items()})
    fp.update({f"dataset.{k}": v for k, v in (d.get("dataset") or {}).items() if k != "limit"})
    fp.pop("kv.profile", None)  # timing instrumentation only
    offload = d.get("offload") or {}
    # Quantized weights / KV and cpu-side attention change the numbers; the other placement keys do not.
    fp.update({f"offload.{k}": offload[k] for k in ("compress_weight", "compress_cache", "cpu_cache_compute")
               if k in offload})
    return fp


@dataclass
class RunState:
    """What a run directory holds: finished dataset positions and the committed length of each output."""
    path: Path
    fingerprint: dict[str, Any]
    window: int  # records per batch window (positions of other shards' windows count as finished)
    shard: tuple[int, int] = (0, 1)
    frontier: int = 0
    done: set[int] = field(default_factory=set)
    lengths: dict[str, int] = field(default_factory=dict)
    prompts: int = 0  # generations written, over all runs of the job
    rejects: int = 0
    batches: int = 0
    complete: bool = False
    limit: int | None = None  # dataset.limit of the run that completed (a higher one continues the run)
    # The dataset as read: file -> (bytes before the furthest finished record's end, their sha256). A file
    # edited under a run (a line prepended) would pair its finished outputs with other records.
    dataset: dict[str, tuple[int, str]] = field(default_factory=dict)
    _read_to: dict[str, int] = field(default_factory=dict, repr=False)  # file -> furthest finished end
    _hashed: dict[str, tuple[int, Any]] = field(default_factory=dict, repr=False)  # file -> (bytes, sha256 so far)

    @property
    def out_dir(self) -> Path:
        return self.path.parent

    def is_done(self, index: int) -> bool:
        return index < self.frontier or index in self.done

    def owns(self, index: int) -> bool:
        """Whether this runner's shard takes the window of dataset position `index`."""
        count, shard = self.shard[1], self.shard[0]
        return (index // self.window) % count == shard

    def mark(self, indices: Iterable[int]) -> None:
        self.done.update(indices)
        while True:  # advance over finished positions and whole windows of other shards
            if not self.owns(self.frontier):
                self.frontier = (self.frontier // self.window + 1) * self.window
            elif self.frontier in self.done:
                self.done.remove(self.frontier)
                self.frontier += 1
            else:
                break

    def read(self, records: Iterable[Prompt | Reject]) -> None:
        """Note finished records' ends in their files (0: a format without byte offsets, not fingerprinted)."""
        for r in records:
            if r.end > self._read_to.get(r.source, 0):
                self._read_to[r.source] = r.end

    def _hash_dataset(self) -> None:
        """Extend each file's sha256 over the bytes read since the last commit (a batch's lines, not the file)."""
        for source, end in self._read_to.items():
            done, digest = self._hashed.get(source, (0, hashlib.sha256()))
            if end <= done:
                continue
            with named_errors(Path(source)), open(source, "rb") as f:
                f.seek(done)
                while done < end and (chunk := f.read(min(end - done, 1 << 20))):
                    digest.update(chunk)
                    done += len(chunk)
            self._hashed[source] = (done, digest)
            self.dataset[source] = (done, digest.hexdigest())

    def rollback(self) -> None:
        """After a failed write: cut every file back to its committed length, so no half line stays."""
        for name, length in self.lengths.items():
            _truncate(self.out_dir / name, length)

    def commit(self) -> None:
        """Record the files' current lengths and the finished positions; atomic (write, fsync, rename)."""
        self.lengths = {name: _size(self.out_dir / name) for name in APPENDED}
        self._hash_dataset()
        write_atomic(self.path, json.dumps({
            "version": _VERSION, "fingerprint": self.fingerprint, "window": self.window, "shard": list(self.shard),
            "frontier": self.frontier, "done": sorted(self.done), "lengths": self.lengths, "prompts": self.prompts,
            "rejects": self.rejects, "batches": self.batches, "complete": self.complete, "limit": self.limit,
            "dataset": {source: list(v) for source, v in self.dataset.items()},
        }, indent=1) + "\n")


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock for the life of a run: a second run into the same directory would truncate
    the first one's files to its own committed lengths. flock, so a killed holder's lock goes with it
    (the kernel drops it with the process) and a stale lock file never blocks."""
    path = out_dir / LOCK_FILE
    with named_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ResumeError(f"output.dir: {out_dir} is in use by another run (pid {holder}); wait for it to "
                              "finish or stop it, or choose another output.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_state(job: JobSpec, window: int, *, fresh: bool = False) -> RunState:
    """The run state of `job.output_dir`: a new one (first run, `fresh`, or `output.resume: false`, which
    clear the old outputs), or the one found there, its files cut back to their committed lengths."""
    out_dir = job.output_dir
    fp = fingerprint(job)
    ds = job.dataset
    shard = (ds.shard_index, ds.shard_count)
    path = out_dir / STATE_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    if not fresh and job.output.resume and path.exists() and _generated_nothing(_read(path)):
        fresh = True  # a run that failed before generating (a bad model path, Ctrl-C while loading) blocks nothing
    if fresh or not job.output.resume:
        for name in (*APPENDED, STATE_FILE, "report.png"):
            (out_dir / name).unlink(missing_ok=True)
    elif path.exists():
        state = _load(path, out_dir, fp, window, shard)
        if state.complete and state.limit != ds.limit:
            state.complete = False  # a larger (or no) limit: the dataset has more to run
        return state
    elif _size(out_dir / GENERATIONS) > 0 and (out_dir / SHARDS).is_dir():  # the state lies in each shard's dir
        raise ResumeError(f"output.dir: {out_dir} holds the outputs of a Ray run (merged from {SHARDS}/); run it "
                          "again with --ray to resume it, or with --fresh to start over in one process")
    elif _size(out_dir / GENERATIONS) > 0:
        raise ResumeError(f"output.dir: {out_dir} holds a {GENERATIONS} but no {STATE_FILE} (written with "
                          "output.resume: false or by an older version), so what it finished is unknown; "
                          "re-run with --fresh to overwrite it, or choose another output.dir")
    for name in APPENDED:
        (out_dir / name).touch()
    state = RunState(path=path, fingerprint=fp, window=window, shard=shard, frontier=ds.offset)
    state.mark(())  # past the windows of other shards
    if job.output.resume:
        state.commit()
    return state


def _generated_nothing(raw: dict[str, Any]) -> bool:
    """An unfinished run with no generation: starting it over loses nothing (rejects are found again)."""
    return raw.get("prompts") == 0 and not raw.get("complete")


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise ValueError(f"version {raw.get('version') if isinstance(raw, dict) else None}")
    except (ValueError, OSError) as e:
        raise ResumeError(f"{path}: unreadable run state ({e}); re-run with --fresh to start over") from None
    return raw


def _load(path: Path, out_dir: Path, fp: dict, window: int, shard: tuple[int, int]) -> RunState:
    raw = _read(path)
    changed = [k for k in sorted(set(fp) | set(raw["fingerprint"])) if fp.get(k) != raw["fingerprint"].get(k)]
    if changed:
        k = changed[0]
        raise ResumeError(f"{k}: output.dir {out_dir} holds a run of this job with {k}: "
                          f"{raw['fingerprint'].get(k)!r}, now {fp.get(k)!r}; resuming would mix outputs of two "
                          "different jobs in one file. Re-run with --fresh to start over, or choose another "
                          "output.dir" + (f" ({len(changed)} keys changed)" if len(changed) > 1 else ""))
    if raw["window"] != window or tuple(raw["shard"]) != shard:
        raise ResumeError(f"output.dir: {out_dir} holds a run cut into windows of {raw['window']} records "
                          f"(shard {raw['shard']}), now {window} (shard {list(shard)}); re-run with --fresh")
    # States written before the dataset was fingerprinted have no "dataset": nothing to check.
    dataset = {source: (n, digest) for source, (n, digest) in raw.get("dataset", {}).items()}
    hashed = {source: _same_prefix(Path(source), n, digest, raw["prompts"]) for source, (n, digest) in dataset.items()}
    for name, length in raw["lengths"].items():
        _truncate(out_dir / name, length)
    return RunState(path=path, fingerprint=fp, window=window, shard=shard, frontier=raw["frontier"],
                    done=set(raw["done"]), lengths=raw["lengths"], prompts=raw["prompts"], rejects=raw["rejects"],
                    batches=raw["batches"], complete=raw["complete"], limit=raw["limit"], dataset=dataset,
                    _read_to={source: n for source, (n, _) in dataset.items()}, _hashed=hashed)


def _same_prefix(path: Path, size: int, expected: str, prompts: int) -> tuple[int, Any]:
    """The sha256 of the first `size` bytes of `path`, which an earlier run read; refused when they changed
    (a line added or edited above where that run got to would shift or swap the records it finished)."""
    digest, done = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while done < size and (chunk := f.read(min(size - done, 1 << 20))):
                digest.update(chunk)
                done += len(chunk)
    except OSError as e:
        raise ResumeError(f"dataset.path: {path}: cannot read it to check it against the run being resumed "
                          f"({e.strerror}); restore it, or re-run with --fresh to start over") from None
    if done < size or digest.hexdigest() != expected:
        raise ResumeError(f"dataset.path: {path} changed since the run being resumed read it (its first {size:,} "
                          f"bytes differ), so its {prompts} finished prompts may not be this file's records; "
                          "restore the file, or re-run with --fresh to start over")
    return done, digest


def _truncate(path: Path, length: int) -> None:
    """Cut what a killed run appended after its last commit (at most the batch in flight)."""
    size = _size(path)
    if size < length:
        raise ResumeError(f"{path}: {size} bytes but the run state committed {length}; the file was changed "
                          "by hand or lost writes. Re-run with --fresh to start over")
    if size > length:
        with path.open("r+b") as f:
            f.truncate(length)
            os.fsync(f.fileno())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with named_errors(path), tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def append_lines(path: Path, lines: Iterable[str], *, durable: bool) -> None:
    """Append `lines` (each without its newline); fsynced when the run is resumable."""
    with named_errors(path), path.open("a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def reorder_windows(path: Path, window: int) -> None:
    """Rewrite a generations file in dataset order. Batches finish window by window, so records are only
    out of order inside a window (length bucketing): sort each window's run of lines by index, holding
    one window in memory at a time, into a temporary file that then replaces the original atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with path.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
        group: list[tuple[int, str]] = []
        for line in src:
            index = json.loads(line)["index"]
            if group and index // window != group[0][0] // window:
                dst.writelines(text for _, text in sorted(group))
                group = []
            group.append((index, line))
        dst.writelines(text for _, text in sorted(group))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
