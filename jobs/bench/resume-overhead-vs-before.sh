#!/usr/bin/env bash
# Issue 6, "Performance": resumability and streaming against the code before them (commit ab43521,
# all prompts read into memory first, no run state, no fsync). Interleaves, per repeat: the old code,
# this code with output.resume: false, this code with output.resume: true, on the job of
# jobs/bench/resume-overhead.yaml. Rows: results/bench/resume-overhead/interleaved.csv (this code) and
# results/bench/resume-overhead/before-issue6.csv (the old code's columns). A few minutes, quiet machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench/resume-overhead
old=$(mktemp -d)/before
git worktree add -f --detach "$old" ab43521 >/dev/null
trap 'git worktree remove --force "$old"' EXIT
common=(--set sweep={} --set hardware.num_threads=2)
for seed in 0 1 2; do
  python - "$old" "$seed" <<'PY'
import subprocess, sys, yaml, pathlib
old, seed = sys.argv[1], sys.argv[2]
job = yaml.safe_load(open("jobs/bench/resume-overhead.yaml"))
job.pop("sweep"); job["output"] = {"dir": "/tmp/resume-before", "csv": str(pathlib.Path("results/bench/resume-overhead/before-issue6.csv").resolve())}
job["generation"]["seed"] = int(seed)
job["dataset"]["path"] = str(pathlib.Path(job["dataset"]["path"]).resolve())
path = pathlib.Path(old) / "before-job.yaml"
path.write_text(yaml.safe_dump(job))
subprocess.run([sys.executable, "run.py", str(path), "--sweep-point", f"before,seed={seed}"], cwd=old, check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
PY
  for resume in false true; do
    python run.py jobs/bench/resume-overhead.yaml "${common[@]}" --set generation.seed=$seed --set output.resume=$resume \
      --set output.dir=/tmp/resume-now-$resume --set output.csv=$out/interleaved.csv --fresh \
      --sweep-point "output.resume=$resume,seed=$seed" >/dev/null 2>&1
  done
  echo "repeat $seed done"
done
