"""Issue 23's Ray faults, on the real model: a job of N prompts sharded over a Ray instance of this machine
(`run.py JOB --ray`, as a user runs it), hit by each fault, compared byte for byte with an uninterrupted
single-process run of the same job (one torch thread, as each Ray worker):

- worker-kill: the Ray workers running the shards are SIGKILLed mid-shard (`--worker-kills`: shard 0, then
  shard 1, then shard 0's retry, ...); Ray retries each task, the retry resumes its shard directory;
- driver-kill: the driver is SIGKILLed mid-run, then the same command is run again until it finishes;
- two-drivers: a second driver (`--fresh`) is started on the same output dir while the first runs; it must
  be refused in one line (the dir's run.lock) and the first must finish unharmed.

    python jobs/bench/ray-faults.py jobs/smollm2-135m.yaml --prompts 32 --out results/bench/ray-faults

Writes OUT/faults.csv, one row per scenario: scenario, prompts, kills (SIGKILLs that landed), duplicates
(ids written more than once), missing (reference ids not written), identical_to_reference, wall_s (the
scenario's wall time, every run of it), git_commit, notes. The runs' output dirs go to a temporary
directory (--keep DIR keeps them there). Exit status 0 when every scenario is identical to the reference.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "jobs" / "bench")]  # the script runs from anywhere

from runner.data.outputs import git_commit  # noqa: E402  (after the path)
from soak import write_prompts  # noqa: E402  (the soak's distinct prompts, cycled from the job's dataset)

# Windows of 2 prompts (one batch each), so every shard commits many times and a kill lands mid-shard.
SETS = ("generation.max_new_tokens=16", "batch.gpu_batch_size=2", "hardware.num_threads=1", "output.resume=true")
# The Ray runs: a fresh Ray instance per driver (cluster.address unset), two one-thread workers.
RAY_SETS = ("cluster.backend=ray", "cluster.workers=2", "cluster.threads_per_worker=1")
COLUMNS = ("scenario", "prompts", "kills", "duplicates", "missing", "identical_to_reference", "wall_s",
           "git_commit", "notes")
TIMEOUT_S = 300  # per run: a hung run fails the bench instead of holding the machine


@dataclass(frozen=True, kw_only=True)
class Bench:
    job: str
    sets: tuple[str, ...]
    work: Path

    def command(self, out_dir: Path, *extra: str, ray: bool = True) -> list[str]:
        sets = [*self.sets, *(RAY_SETS if ray else ()), f"dataset.path={self.work / 'prompts.jsonl'}", f"output.dir={out_dir}",
                f"output.csv={out_dir / 'throughput.csv'}"]
        return [sys.executable, str(ROOT / "run.py"), self.job, *(a for s in sets for a in ("--set", s)), *extra]

    def start(self, out_dir: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(out_dir, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def run(self, out_dir: Path, *extra: str, ray: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(out_dir, *extra, ray=ray), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)


def _committed(shard_dir: Path) -> int:
    try:
        return int(json.loads((shard_dir / "state.json").read_text())["prompts"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait(done: Callable[[], bool], proc: subprocess.Popen, what: str) -> bool:
    """Poll `done()` until true (True) or `proc` exits first (False)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"ray-faults: timed out waiting for {what}")
        time.sleep(0.005)
    return True


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def _shard_worker(driver: int, shard: int) -> int | None:
    """The pid of the Ray worker running `shard-<shard>` under `driver` (Ray titles a worker by its task).
    Only the driver's descendants: another Ray run on the machine has workers of the same title."""
    parents = _parents()
    for pid in parents:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.split(b"\0")[0].strip() != f"ray::shard-{shard}".encode():
            continue
        up = pid
        while up > 1 and up != driver:
            up = parents.get(up, 1)
        if up == driver:
            return pid
    return None


def check(out_dir: Path, reference: Path) -> dict:
    """The scenario's output against the reference: duplicate and missing ids, byte-identical or not."""
    path = out_dir / "generations.jsonl"
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
    expected = {json.loads(line)["id"] for line in (reference / "generations.jsonl").read_text().splitlines()}
    return {"duplicates": sum(n - 1 for n in Counter(ids).values()), "missing": len(expected - set(ids)),
            "identical_to_reference": path.exists() and path.read_bytes() == (reference / "generations.jsonl")
            .read_bytes()}


def worker_kill(bench: Bench, out_dir: Path, kills: list[tuple[int, int]]) -> tuple[int, str]:
    """SIGKILL shard s's worker once shard s has committed p prompts, for each (s, p) in turn."""
    driver = bench.start(out_dir)
    landed, notes = 0, []
    for shard, prompts in kills:
        shard_dir = out_dir / "shards" / str(shard)
        if not _wait(lambda: _committed(shard_dir) >= prompts, driver, f"shard {shard} to commit {prompts}"):
            break
        pid = _shard_worker(driver.pid, shard)
        if pid is None:  # the shard finished before the kill: nothing to kill
            notes.append(f"shard {shard} done before kill at {prompts}")
            continue
        os.kill(pid, signal.SIGKILL)
        landed += 1
        notes.append(f"shard {shard} killed at {_committed(shard_dir)} committed")
    _, err = driver.communicate(timeout=TIMEOUT_S)
    if driver.returncode != 0:
        notes.append(f"driver exit {driver.returncode}: {err.strip().splitlines()[-1:]}")
    return landed, "; ".join(notes)


def driver_kill(bench: Bench, out_dir: Path, at: int) -> tuple[int, str]:
    """SIGKILL the driver once shard 0 has committed `at` prompts, then run the same command to the end."""
    driver = bench.start(out_dir)
    shard0 = out_dir / "shards" / "0"
    killed = _wait(lambda: _committed(shard0) >= at, driver, f"shard 0 to commit {at}")
    if killed:
        driver.kill()
    driver.communicate(timeout=TIMEOUT_S)
    notes = [f"driver killed at {_committed(shard0)} committed in shard 0" if killed else "driver ended first"]
    for attempt in range(3):  # the rerun; retried only if a dying worker of the killed run still held a shard
        rerun = bench.run(out_dir)
        notes.append(f"rerun {attempt + 1}: exit {rerun.returncode}")
        if rerun.returncode == 0:
            break
        notes.append(" ".join(rerun.stderr.strip().splitlines()[-1:]))
    return int(killed), "; ".join(notes)


def two_drivers(bench: Bench, out_dir: Path) -> tuple[int, str]:
    """A second driver (--fresh) on the dir while the first holds its lock: refused in one line?"""
    first = bench.start(out_dir)
    _wait(lambda: (out_dir / "run.lock").exists() and (out_dir / "run.lock").read_text().strip() == str(first.pid),
          first, "the first driver's lock")
    second = bench.run(out_dir, "--fresh")
    lines = second.stderr.strip().splitlines()
    refused = second.returncode == 2 and len(lines) == 1 and "is in use by another run" in lines[0]
    notes = [f"second driver: exit {second.returncode}, {'refused in one line' if refused else lines[-3:]}",
             f"first still running then: {first.poll() is None}"]
    _, err = first.communicate(timeout=TIMEOUT_S)
    notes.append(f"first driver: exit {first.returncode}")
    if first.returncode != 0:
        notes.append(" ".join(err.strip().splitlines()[-1:]))
    return 0, "; ".join(notes)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True, help="where faults.csv goes")
    parser.add_argument("--set", action="append", default=[], help="job overrides, as run.py's --set")
    parser.add_argument("--worker-kills", default="0:4,1:6,0:10",
                        help="SHARD:PROMPTS,...: kill shard SHARD's worker once it has committed PROMPTS")
    parser.add_argument("--driver-kill-at", type=int, default=6, help="prompts committed in shard 0")
    parser.add_argument("--keep", type=Path, help="keep the runs' output dirs here (default: removed)")
    args = parser.parse_args(argv)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="ray-faults-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(job=args.job, sets=(*SETS, *args.set, f"dataset.limit={args.prompts}"), work=work)
    write_prompts(args.job, args.set, args.prompts, work / "prompts.jsonl")
    kills = [(int(s), int(p)) for s, p in (k.split(":") for k in args.worker_kills.split(","))]
    reference = work / "reference"
    ref = bench.run(reference, ray=False)  # one process, one thread: what every scenario must equal
    if ref.returncode != 0:
        sys.exit(f"ray-faults: the reference run exited {ref.returncode}:\n{ref.stderr[-3000:]}")
    rows = []
    for name, scenario in (("worker-kill", lambda d: worker_kill(bench, d, kills)),
                           ("driver-kill", lambda d: driver_kill(bench, d, args.driver_kill_at)),
                           ("two-drivers", lambda d: two_drivers(bench, d))):
        started = time.monotonic()
        landed, notes = scenario(work / name)
        rows.append({"scenario": name, "prompts": args.prompts, "kills": landed, **check(work / name, reference),
                     "wall_s": round(time.monotonic() - started, 1), "git_commit": git_commit(), "notes": notes})
        print(f"ray-faults: {rows[-1]}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "faults.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["identical_to_reference"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
