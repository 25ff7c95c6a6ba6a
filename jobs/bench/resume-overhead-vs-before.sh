#!/usr/bin/env bash
# Issue 6, "Performance": resumability and streaming against the code before them (commit ab43521,
# all prompts read into memory first, no run state, no fsync). Interleaves, per repeat: the old code,
# this code with output.resume: false, this code with output.resume: true, on the job of
# jobs/bench/resume-overhead.yaml. Rows: results/bench/resume-overhead/interleaved.csv (this code) and
# results/bench/resume-overhead/before-issue6.csv (the old code's columns), and per run, from its batches.csv,
# the loop's wall time against its generation time: results/bench/resume-overhead/overhead.csv. The rows'
# throughputs time generation only; what resumability adds (writes, fsyncs, state commits) and streaming
# adds (parsing and tokenizing inside the loop) is the wall time beyond it. About 6 minutes, quiet machine.
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
job.pop("sweep"); job["output"] = {"dir": f"/tmp/resume-before-{seed}", "csv": str(pathlib.Path("results/bench/resume-overhead/before-issue6.csv").resolve())}
job["generation"]["seed"] = int(seed)
job["dataset"]["path"] = str(pathlib.Path(job["dataset"]["path"]).resolve())
path = pathlib.Path(old) / "before-job.yaml"
path.write_text(yaml.safe_dump(job))
subprocess.run([sys.executable, "run.py", str(path), "--sweep-point", f"before,seed={seed}"], cwd=old, check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
PY
  for resume in false true; do
    python run.py jobs/bench/resume-overhead.yaml "${common[@]}" --set generation.seed=$seed --set output.resume=$resume \
      --set output.dir=/tmp/resume-now-$resume-$seed --set output.csv=$out/interleaved.csv --fresh \
      --sweep-point "output.resume=$resume,seed=$seed" >/dev/null 2>&1
  done
  echo "repeat $seed done"
done
python - <<'PY'
import pandas as pd
rows = []
for seed in (0, 1, 2):
    for code, resume, d in (("ab43521", "", f"/tmp/resume-before-{seed}"), ("this", "false", f"/tmp/resume-now-false-{seed}"),
                            ("this", "true", f"/tmp/resume-now-true-{seed}")):
        b = pd.read_csv(f"{d}/batches.csv")
        gen, wall = float((b.prefill_s + b.decode_s).sum()), float(b.elapsed_s.iloc[-1])
        rows.append(dict(repeat=seed, code=code, output_resume=resume, batches=len(b), prompts=int(b.prompts.sum()),
                         generated_tokens=int(b.generated_tokens.sum()), generation_s=round(gen, 4), wall_s=round(wall, 4),
                         loop_overhead_pct=round(100 * (wall - gen) / wall, 3),
                         tokens_per_generation_s=round(b.generated_tokens.sum() / gen, 2),
                         tokens_per_wall_s=round(b.generated_tokens.sum() / wall, 2)))
pd.DataFrame(rows).to_csv("results/bench/resume-overhead/overhead.csv", index=False)
print(pd.DataFrame(rows).to_string())
PY
