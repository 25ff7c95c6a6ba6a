#!/usr/bin/env python
"""Command line: `python run.py JOB.yaml [--set section.key=value ...]`.

The only place with argparse and printing. A job with a `sweep` runs each grid point in its
own subprocess (so each row's peak memory is that point's alone), all rows in one CSV. A job
with an `eval` section runs the accuracy harness instead (accuracy.csv and accuracy.png).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from runner.job import JobError, load_job

FIELDS = ("engine", "gpu_batch_size", "num_prompts", "prompt_len", "gen_len", "prefill_throughput",
          "decode_throughput", "total_throughput", "peak_cpu_bytes")


def _label(point: dict) -> str:
    return ",".join(f"{k}={_flat(v)}" for k, v in point.items())


def _flat(value) -> str:
    """A sweep value as short text; a mapping (a whole section) as key-value pairs."""
    if isinstance(value, dict):
        return "-".join(f"{k}-{_flat(v)}" for k, v in value.items())
    return str(value)


def _slug(point: dict) -> str:
    """A directory name for a sweep point: letters, digits and . _ - only."""
    text = "_".join(f"{k.split('.')[-1]}-{_flat(v)}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace(" ", "-"))


def _run_sweep(args: argparse.Namespace, job) -> int:
    base_dir = job.output_dir
    failures = 0
    for point, _ in job.sweep_points():
        label = _label(point)
        safe = _slug(point)
        sets = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in point.items()] + [
            f"output.dir={base_dir / 'points' / safe}", f"output.csv={job.throughput_csv}", "sweep={}"]
        cmd = [sys.executable, os.path.abspath(__file__), args.job, *sum((["--set", s] for s in args.set), []),
               *sum((["--set", s] for s in sets), []), "--sweep-point", label]
        print(f"== sweep point {label}", flush=True)
        failures += subprocess.run(cmd).returncode != 0
    print(f"sweep done: {len(job.sweep_points()) - failures} ok, {failures} failed; rows in {job.throughput_csv}")
    return 1 if failures else 0


def _run_eval(job) -> int:
    from runner.eval.harness import run_eval  # heavy imports (torch) only when actually running
    try:
        report = run_eval(job)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max((len(r["kv_label"]) for r in report.rows), default=0)
    for r in report.rows:
        print(f"{r['data']:<40} {r['kv_label']:<{width}} {r['metric']:<10} {r['value']}")
    print(f"eval done: {report.computed} points run, {report.skipped} already in {report.csv}; plot: {report.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="alisa-runner: offline batch generation with sparse KV caching")
    parser.add_argument("job", help="job YAML file (see README)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a job field, e.g. --set batch.gpu_batch_size=32")
    parser.add_argument("--sweep-point", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job, args.set)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if job.sweep:
        return _run_sweep(args, job)
    if job.eval is not None:
        return _run_eval(job)
    from runner.run_job import run_job  # heavy imports (torch) only when actually running
    try:
        row = run_job(job, sweep_point=args.sweep_point)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={row[k]}" for k in FIELDS))
    print(f"outputs: {job.output_dir / 'generations.jsonl'}; throughput row appended to {job.throughput_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
