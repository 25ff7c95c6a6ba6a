"""Issue 23's soak: a job of N prompts killed with SIGKILL every K seconds and re-run until it completes,
then compared byte for byte with an uninterrupted run of the same job.

    python jobs/bench/soak.py jobs/smollm2-135m.yaml --prompts 2000 --kill-every 180 --out results/bench/soak \\
        --set hardware.num_threads=2

K counts from each run's start, model load included: it must exceed the load plus one batch, or no run
commits anything (--max-runs ends such a soak). The prompts are the job's JSONL dataset cycled to N records, each made distinct by its number (written to
OUT/prompts.jsonl). Writes under OUT:
- reference/ and soak/: the two runs' output dirs;
- rss.csv: every `--sample` seconds, each live run.py's RSS (run `reference` or `soak-<k>`), with the
  prompts committed so far: flat RSS over the night is the claim;
- kills.csv: one row per kill: the prompts committed then, the seconds since the last commit and the
  generation lines appended past it (the work a kill loses: at most the batch in flight);
- summary.csv: runs, kills, wall seconds of each phase, and whether the files are identical.
Exit status 0 when generations.jsonl of both runs are identical, 1 when not, 2 when the soak never
completed within --max-runs.
"""
from __future__ import annotations

import argparse
import csv
import filecmp
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from runner.job import load_job  # noqa: E402  (after the path: the script runs from anywhere)


@dataclass
class Soak:
    job: str
    sets: list[str]
    out: Path
    sample_s: float
    rss: csv.writer

    def command(self, out_dir: Path) -> list[str]:
        sets = [*self.sets, f"dataset.path={self.out / 'prompts.jsonl'}", f"output.dir={out_dir}",
                f"output.csv={out_dir / 'throughput.csv'}"]
        return [sys.executable, str(ROOT / "run.py"), self.job, *(a for s in sets for a in ("--set", s))]

    def run(self, label: str, out_dir: Path, kill_after: float | None) -> tuple[int, float]:
        """One run.py, its RSS sampled; SIGKILLed after `kill_after` seconds. Returns (exit status, seconds)."""
        started = time.monotonic()
        proc = subprocess.Popen(self.command(out_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            self.rss.writerow([round(elapsed, 2), label, proc.pid, _rss_mb(proc.pid), _committed(out_dir)])
            if kill_after is not None and elapsed >= kill_after:
                proc.kill()
                break
            time.sleep(self.sample_s)
        _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGKILL):
            sys.exit(f"{label}: run.py exited {proc.returncode}:\n{err[-3000:]}")
        return proc.returncode, time.monotonic() - started


def _rss_mb(pid: int) -> float | str:
    """Resident set of `pid` in MB, "" once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return ""


def _state(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _committed(out_dir: Path) -> int:
    return int(_state(out_dir).get("prompts", 0))


def _lost(out_dir: Path) -> tuple[float, int]:
    """(seconds since the last commit, generation lines appended past it), read just after a kill."""
    state_file, gen = out_dir / "state.json", out_dir / "generations.jsonl"
    if not state_file.exists() or not gen.exists():
        return 0.0, 0
    committed = _state(out_dir).get("lengths", {}).get("generations.jsonl", 0)
    with gen.open("rb") as f:
        f.seek(committed)
        past = f.read().count(b"\n")
    return round(time.time() - state_file.stat().st_mtime, 2), past


def write_prompts(job_path: str, sets: list[str], n: int, dest: Path) -> None:
    """N JSONL records cycled from the job's dataset, each prompt made distinct by its number."""
    job = load_job(job_path, sets)
    field = job.dataset.field or "prompt"
    path = Path(job.dataset.path)
    path = path if path.is_absolute() else ROOT / path  # run.py runs from the repository root
    source = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    with dest.open("w", encoding="utf-8") as f:
        for i in range(n):
            record = dict(source[i % len(source)])
            record[field] = f"{record[field]} ({i})"
            if "id" in record:
                record["id"] = f"soak-{i}"
            f.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--kill-every", type=float, required=True, help="seconds each soak run lives before SIGKILL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="job overrides, as run.py's --set")
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--max-runs", type=int, default=1000)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # run.py runs from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    sets = [*args.set, f"dataset.limit={args.prompts}", "output.resume=true"]
    write_prompts(args.job, args.set, args.prompts, args.out / "prompts.jsonl")
    with (args.out / "rss.csv").open("w", newline="") as rss_file, \
            (args.out / "kills.csv").open("w", newline="") as kills_file:
        rss, kills = csv.writer(rss_file), csv.writer(kills_file)
        rss.writerow(["t_s", "run", "pid", "rss_mb", "committed_prompts"])
        kills.writerow(["kill", "at_s", "committed_prompts", "s_since_commit", "uncommitted_lines"])
        soak = Soak(job=args.job, sets=sets, out=args.out, sample_s=args.sample, rss=rss)
        _, reference_s = soak.run("reference", args.out / "reference", None)
        soak_dir, soak_s, runs, code = args.out / "soak", 0.0, 0, -1
        while code != 0 and runs < args.max_runs:
            code, seconds = soak.run(f"soak-{runs}", soak_dir, args.kill_every)
            soak_s, runs = soak_s + seconds, runs + 1
            if code != 0:
                kills.writerow([runs, round(soak_s, 2), _committed(soak_dir), *_lost(soak_dir)])
            rss_file.flush()
            kills_file.flush()
    same = code == 0 and filecmp.cmp(args.out / "reference" / "generations.jsonl", soak_dir / "generations.jsonl",
                                     shallow=False)
    with (args.out / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["prompts", "kill_every_s", "runs", "kills", "reference_s", "soak_s", "identical"],
                                 [args.prompts, args.kill_every, runs, runs - (code == 0), round(reference_s, 1),
                                  round(soak_s, 1), same]])
    print(f"soak: {runs} runs, {runs - (code == 0)} kills, {'identical' if same else 'DIFFERENT'} "
          f"generations.jsonl; {args.out}/rss.csv, kills.csv, summary.csv")
    if code != 0:
        return 2
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
