#!/usr/bin/env bash
# The prepared GPU check of issues 4, 5 and 20 (about 6 minutes on one H200-class GPU). Run it from the repository
# root after the README's setup, with a CUDA build of torch installed in the active environment:
#
#   tests/gpu/check.sh [--set section.key=value ...]   # extra arguments go to the throughput job
#
# (a) the copy-engine / executor / KV-tier tests with ALISA_TEST_DEVICE=cuda (the `compute_device`
#     fixture in tests/conftest.py): equivalence with overlap on and off, side-stream ordering; and
#     issue 20's streaming load: safetensors checkpoints the tests generate, read tensor by tensor
#     straight into the gpu, pinned cpu and disk tiers on CUDA, generating as the plain engine does;
# (b) issue 5: `run.py calibrate --device cuda` (the CUDA path of runner/plan/calibrate.py, never run on a GPU
#     before) writes results/gpu/calibrated.yaml;
# (c) one throughput job on CUDA (jobs/gpu/flexgen-vs-alisa-opt1.3b.yaml, dummy OPT-1.3B fp16, weights
#     half on the gpu pool and half in pinned host memory) on that profile, whose CSV rows it prints with
#     the cost model's predicted throughput beside the measured one.
set -euo pipefail

PY=${PYTHON:-python}
JOB=jobs/gpu/flexgen-vs-alisa-opt1.3b.yaml
CSV=results/gpu/flexgen-vs-alisa-opt1.3b/throughput.csv

if ! "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "tests/gpu/check.sh: needs a CUDA GPU and a CUDA build of torch ($PY: torch.cuda.is_available() is false)" >&2
    exit 2
fi
if [[ ! -f "$JOB" ]]; then
    echo "tests/gpu/check.sh: run it from the repository root ($JOB not found)" >&2
    exit 2
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'

# Budget: at most 150 s of tests + 120 s of calibration + 140 s of job (timeout kills any), about 7 minutes.
# (a) Tests: the copy engine (CUDA side streams) and the executor / KV placement equivalence tests.
tests=()
for f in tests/test_copy_engine.py tests/test_executor.py tests/test_kv_placement.py; do
    if [[ -f "$f" ]]; then tests+=("$f"); fi
done
tests+=("tests/test_lazy.py::test_a_checkpoint_streams_into_its_tiers_and_generates_as_the_plain_engine")
echo "== (a) ALISA_TEST_DEVICE=cuda pytest ${tests[*]}"
start=$SECONDS
ALISA_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q "${tests[@]}"
echo "   tests: $((SECONDS - start)) s"

# (b) Calibration on the GPU (about a minute).
PROFILE=results/gpu/calibrated.yaml
mkdir -p results/gpu
echo "== (b) $PY run.py calibrate --device cuda --out $PROFILE"
start=$SECONDS
timeout 120 "$PY" run.py calibrate --device cuda --out "$PROFILE"
echo "   calibration: $((SECONDS - start)) s"

# (c) Throughput on CUDA. The CSV is appended to (one row per run), so print only this run's rows.
set -- --set "hardware.profile=$PROFILE" "$@"
echo "== (c) $PY run.py $JOB $*"
before=0  # rows already there (csv-parsed: a quoted note may span lines)
if [[ -f "$CSV" ]]; then
    before=$("$PY" -c 'import csv, sys; print(sum(1 for _ in csv.DictReader(open(sys.argv[1], newline=""))))' "$CSV")
fi
start=$SECONDS
timeout 140 "$PY" run.py "$JOB" "$@"
echo "   job: $((SECONDS - start)) s"
echo "== rows in $CSV"
"$PY" - "$CSV" "$before" <<'EOF' | column -s, -t
import csv, sys

path, skip = sys.argv[1], int(sys.argv[2])
with open(path, newline="") as f:
    rows = list(csv.DictReader(f))[max(skip, 0):]
keys = ["engine", "model", "dtype", "device", "kv_policy", "gpu_batch_size", "num_gpu_batches", "prompt_len",
        "gen_len", "prefill_throughput", "decode_throughput", "total_throughput", "peak_gpu_bytes",
        "peak_gpu_pool_bytes", "peak_cpu_pool_bytes", "bytes_gpu_from_cpu", "transfer_wait_s",
        "predicted_total_throughput"]
keys = [k for k in keys if rows and k in rows[0]]  # columns this version of the CSV has
print(",".join(keys))
for row in rows:
    print(",".join(row[k] for k in keys))
EOF
