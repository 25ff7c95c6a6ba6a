#!/usr/bin/env python
"""Command line: `python run.py JOB.yaml [--set section.key=value ...]`, or
`python run.py calibrate [--out PROFILE.yaml] ...` to measure this machine into a hardware profile.

The only place with argparse and printing. A job with a `sweep` runs each grid point in its
own subprocess (so each row's peak memory is that point's alone), all rows in one CSV. A job
with an `eval` section runs the accuracy harness instead (accuracy.csv and accuracy.png).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from runner.job import JobError, load_job
from runner.units import format_gib

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
               *sum((["--set", s] for s in sets), []), "--sweep-point", label, *(["--fresh"] if args.fresh else [])]
        print(f"== sweep point {label}", flush=True)
        code = _run_point(cmd)
        if code in _STOPPED:  # the point was stopped by SIGINT / SIGTERM (the process group gets it): stop too
            print(f"sweep interrupted at point {label}; run the same command again to resume", file=sys.stderr)
            return code
        failures += code != 0
    print(f"sweep done: {len(job.sweep_points()) - failures} ok, {failures} failed; rows in {job.throughput_csv}")
    return 1 if failures else 0


# Exit codes of a point stopped by SIGINT / SIGTERM: its own 128 + signum, or -signum if the signal killed it.
_STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def _run_point(cmd: list[str]) -> int:
    """Run one sweep point's process to its end. Ctrl-C reaches the point itself (the terminal signals the
    whole process group), which finishes its batch and exits resumable: this process only waits for it.
    SIGTERM (sent to this process alone) is passed on to the point, which does the same."""
    child = subprocess.Popen(cmd)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _run_eval(job) -> int:
    from runner.run_eval import run_eval  # heavy imports (torch) only when actually running
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


def _run_ray(args: argparse.Namespace, job) -> int:
    """`--ray [ADDRESS]` or `cluster: ray`: the job sharded over Ray workers, outputs merged (runner/cluster.py)."""
    if args.ray is not None:  # the flag becomes the job's cluster section, so sweep points (own processes) get it
        args.set += ["cluster.backend=ray"] + ([f"cluster.address={json.dumps(args.ray)}"] if args.ray != "local" else [])
        try:
            job = load_job(args.job, args.set)
        except JobError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if job.sweep:
        return _run_sweep(args, job)
    from runner.cluster import run_on_ray  # heavy imports (ray) only when actually running
    try:
        row = run_on_ray(job, sweep_point=args.sweep_point, fresh=args.fresh)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _already_complete(job, row, job.output_dir / "shards"):
        return 0
    print(" ".join(f"{k}={row.get(k, '')}" for k in (*FIELDS, "workers", "status")))
    where = f"{job.output_dir / 'generations.jsonl'} (merged from {row['workers']} shards in {job.output_dir / 'shards'})"
    if row["status"] == "interrupted":
        print(f"interrupted: what the shards finished is kept in {where}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(f"outputs: {where}; throughput row appended to {job.throughput_csv}{_rejected(job, row)}")
    return 0


def _already_complete(job, row: dict, where: Path) -> bool:
    """A re-run of a finished job ran nothing (and wrote no row): say so."""
    if row["num_prompts"] or row["status"] != "complete" or not row.get("resumed_prompts"):
        return False
    print(f"{job.name}: already complete ({row['resumed_prompts']} prompts in {where}); nothing to do. "
          "--fresh starts over")
    return True


def _rejected(job, row: dict) -> str:
    n = row.get("rejected_prompts")
    return f"; {n} records rejected: {job.output_dir / 'rejects.jsonl'}" if n else ""


def _calibrate(argv: list[str]) -> int:
    """`python run.py calibrate`: measure this machine, print each measurement, write the profile YAML."""
    parser = argparse.ArgumentParser(prog="run.py calibrate",
                                     description="measure this machine into a hardware profile (runner/plan/calibrate.py)")
    parser.add_argument("--out", default=None, help="profile YAML to write (default results/calibration/<hostname>.yaml)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--offload-dir", default=None,
                        help="existing directory for the disk measurements (default offload/, created if missing)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds: checks the tool, not the machine")
    parser.add_argument("--note", default="", help="a line for the profile's header (e.g. what else the machine ran)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop with an error after this much wall time (default 120; 20 with --quick)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"results/calibration/{socket.gethostname()}.yaml")
    offload_dir = args.offload_dir or "offload/"
    import torch  # heavy imports only when actually running
    from runner.plan.calibrate import CalibrationError, calibrate, describe_machine
    from runner.plan.hardware import dump_profile
    try:  # fail before a minute of measuring, not after
        device = torch.device(_calibration_device(args.device, torch.cuda.is_available()))
        _check_calibration_paths(out, offload_dir, create_offload_dir=args.offload_dir is None)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.max_seconds is not None and not args.max_seconds > 0:
            raise ValueError(f"--max-seconds: must be > 0, got {args.max_seconds:g}")
        print(f"calibrating {device} with {torch.get_num_threads()} torch threads "
              f"({'a few seconds' if args.quick else 'about a minute'})", flush=True)
        start = time.perf_counter()
        try:
            profile, rows = calibrate(device=device, offload_dir=offload_dir, quick=args.quick, name=out.stem,
                                      max_seconds=args.max_seconds)
        except CalibrationError as e:  # the machine's state, not the command line: exit 1, no profile
            print(f"error: {e}; no profile written", file=sys.stderr)
            return 1
        header = [f"Measured by `python run.py calibrate {shlex.join(argv)}` on "
                  f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {time.perf_counter() - start:.0f} s, "
                  f"torch {torch.__version__}", describe_machine(device)] + ([args.note] if args.note else [])
        header += ["Figures (median of repeats, each within its plausible range; field <- measurement, shape: value):"]
        header += [_row_text(r) for r in rows]
        _write_whole(out, dump_profile(profile, "\n".join(header)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(_row_text(r) for r in rows))
    print(f"calibration done in {time.perf_counter() - start:.1f} s; profile: {out}")
    return 0


def _write_whole(out: Path, text: str) -> None:
    """`text` into `out` whole or not at all: written beside it, then renamed over it."""
    part = out.with_name(out.name + ".part")
    try:
        part.write_text(text)
        os.replace(part, out)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise OSError(f"--out {out}: cannot write: {e.strerror}") from None


def _calibration_device(name: str, has_cuda: bool) -> str:
    if name == "cuda" and not has_cuda:
        raise ValueError("--device cuda: torch sees no CUDA device")
    return "cuda" if name == "cuda" or (name == "auto" and has_cuda) else "cpu"


def _check_calibration_paths(out: Path, offload_dir: str, *, create_offload_dir: bool) -> None:
    if create_offload_dir:
        os.makedirs(offload_dir, exist_ok=True)
    if not os.path.isdir(offload_dir):
        raise ValueError(f"--offload-dir {offload_dir}: no such directory")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot create {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out}: not writable")


def _row_text(r: dict) -> str:
    seconds = "" if r["seconds"] is None else f" in {r['seconds'] * 1e3:.3f} ms"
    seconds += "" if r["spread"] is None else f" (repeats within {r['spread']:g}x)"
    return f"{r['field'] or '-':<28} {r['name']}, {r['shape']}{seconds}: {r['value']:g} {r['unit']}"


def _print_quality(job) -> int:
    """`kv.max_ppl_increase`: print the KV its grid picks (run_job picks the same again); a budget nothing
    meets is an error here, before any model loads. 0, or the exit code of that error."""
    if job.kv.max_ppl_increase is None:
        return 0
    from runner.planner import resolve_quality  # heavy imports (torch) only when actually running
    try:
        _, choice = resolve_quality(job)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(choice.line(), flush=True)
    return 0


def _plan(job) -> int:
    """`--plan`: for the job (or each sweep point), its own plan and the searched ALISA and FlexGen plans,
    predicted side by side; printed, and one row per candidate in <output dir>/plan.csv."""
    import pandas as pd
    from runner.planner import plan_job, plan_rows
    rows = []
    for point, point_job in job.sweep_points():
        label = _label(point)
        if label:
            print(f"\n# ==== sweep point {label}")
        try:
            report = plan_job(point_job)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _print_plan(point_job, report)
        rows += plan_rows(report, point_job, label)
    path = job.output_dir / "plan.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    print(f"\nplan rows written to {path}")
    return 0


def _print_plan(job, report) -> None:
    import yaml
    from runner.planner import plan_sections
    budgets = ", ".join(f"{t.value} {format_gib(b)}" for t, b in report.budgets.items())
    if report.quality is not None:
        print(f"# {report.quality.line()}")
    print(f"# profile {report.profile.name}; budgets {budgets}; {str(report.dtype).removeprefix('torch.')}; "
          f"kv {report.kv_label}")
    rows = [("job's own plan", report.job_plan, report.job_prediction, None)]
    rows += [(f"{name} (searched)", r.plan if r else None, r.prediction if r else None, r)
             for name, r in (("alisa", report.alisa), ("flexgen", report.flexgen))]
    for title, plan, pred, result in rows:
        print(f"\n## {title}")
        if pred is None:
            print("# offload: auto" if job.auto_offload and plan is report.job_plan else "# no plan fits the budgets")
            continue
        if plan is report.job_plan and not report.job_fits:
            need = ", ".join(f"{t.value} {format_gib(n)}" for t, n in pred.peak_bytes.items() if n > report.budgets[t])
            print(f"# does NOT fit the budgets: needs {need}")
        extra = f" ({result.evaluated} plans evaluated in {result.seconds:.2f} s)" if result else ""
        print(f"# predicted tokens/s: prefill {pred.prefill_throughput:.2f}, decode {pred.decode_throughput:.2f}, "
              f"total {pred.total_throughput:.2f}; bound by {pred.bound}{extra}")
        print("# peak memory: " + ", ".join(f"{t.value} {format_gib(n, 3)}" for t, n in pred.peak_bytes.items()))
        if any(pred.phase_s[1:]):
            print("# decode seconds by phase: " + ", ".join(f"{p} {s:.2f}" for p, s in zip(("I", "II", "III"),
                                                                                          pred.phase_s)))
        print(yaml.safe_dump(plan_sections(plan), sort_keys=False).rstrip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        return _calibrate(argv[1:])
    parser = argparse.ArgumentParser(description="alisa-runner: offline batch generation with sparse KV caching")
    parser.add_argument("job", help="job YAML file (see README)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a job field, e.g. --set batch.gpu_batch_size=32")
    parser.add_argument("--plan", action="store_true",
                        help="print the searched ALISA and FlexGen plans and the predictions on hardware.profile; "
                             "loads no weights, runs nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: delete this job's generations, rejects, batches and run state in its "
                             "output dir (throughput.csv keeps its rows) instead of resuming")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="shard the job over Ray workers and merge their outputs (cluster.backend: ray); "
                             "ADDRESS: auto, host:port or ray://host:port (default: a Ray instance on this machine)")
    parser.add_argument("--sweep-point", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job, args.set)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        return _plan(job)
    if not job.sweep and (code := _print_quality(job)):
        return code
    if args.ray is not None or job.cluster.on_ray:
        return _run_ray(args, job)
    if job.sweep:
        return _run_sweep(args, job)
    if job.eval is not None:
        return _run_eval(job)
    try:
        from runner.run_job import Interrupted, run_job  # heavy imports (torch) only when actually running
        row = run_job(job, sweep_point=args.sweep_point, fresh=args.fresh)
    except KeyboardInterrupt:  # Ctrl-C outside the batch loop (imports, model load): nothing in flight to keep
        print(f"interrupted while loading or finishing (no batch in flight); everything committed in "
              f"{job.output_dir} is kept: run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as e:
        print(" ".join(f"{k}={e.row[k]}" for k in FIELDS))
        print(f"{e}; partial-run row appended to {job.throughput_csv}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention for death by a signal
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _already_complete(job, row, job.output_dir):
        return 0
    print(" ".join(f"{k}={row[k]}" for k in FIELDS))
    resumed = f" (resumed after {row['resumed_prompts']} prompts)" if row["resumed_prompts"] else ""
    print(f"outputs: {job.output_dir / 'generations.jsonl'}{resumed}; throughput row appended to "
          f"{job.throughput_csv}{_rejected(job, row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
