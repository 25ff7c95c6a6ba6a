"""Issue 6, "Datasets": a 1,000,000-line JSONL file streams at flat memory and its first batch starts in
seconds. `python jobs/bench/streaming-1m.py` (about a minute, quiet machine) writes, under
results/bench/streaming-1m/:
- reader.csv: the dataset reader alone in its own process: seconds to the first record, RSS after 100k
  and after 1M records, seconds for the whole file;
- throughput.csv: two rows of the main job (batch 2, 4 new tokens): over the file's first 4 records, and
  over the whole file stopped with SIGINT once two batches are committed (1M prompts would take days);
  their peak_cpu_bytes compare a 4-record run with a 1M-record one;
- first_batches.csv: seconds from starting run.py on the 1M-line file to its second committed batch
  (model load included).
"""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "bench" / "streaming-1m"
LINES = 1_000_000

READER = """
import json, resource, sys, time
t0 = time.perf_counter()
from runner.data.dataset import iter_records
from runner.data.spec import DatasetSpec
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
out, start = {}, time.perf_counter()
for i, r in enumerate(iter_records(DatasetSpec(path=sys.argv[1])), start=1):
    if i == 1:
        out["first_record_s"] = round(time.perf_counter() - start, 4)
    if i == 100_000:
        out["rss_100k_bytes"] = rss()
out.update(records=i, all_records_s=round(time.perf_counter() - start, 2), rss_1m_bytes=rss())
print(json.dumps(out))
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, small = Path(tmp) / "big.jsonl", Path(tmp) / "small.jsonl"
        for path, n in ((data, LINES), (small, 4)):
            with path.open("w") as f:
                f.writelines(json.dumps({"id": f"q{i}", "prompt": f"Count to {i % 97}."}) + "\n" for i in range(n))
        reader = json.loads(subprocess.run([sys.executable, "-c", READER, str(data)], cwd=ROOT, check=True,
                                           capture_output=True, text=True).stdout)
        reader["rss_growth_bytes"] = reader["rss_1m_bytes"] - reader["rss_100k_bytes"]
        _write(OUT / "reader.csv", [reader])
        csv_path = OUT / "throughput.csv"
        csv_path.unlink(missing_ok=True)  # this run's two rows only
        common = ["jobs/smollm2-135m.yaml", "--set", "generation.max_new_tokens=4", "--set", "batch.gpu_batch_size=2",
                  "--set", f"output.csv={csv_path}", "--fresh"]
        subprocess.run([sys.executable, "run.py", *common, "--set", f"dataset.path={small}", "--set",
                        f"output.dir={tmp}/small", "--sweep-point", "records=4"], cwd=ROOT, check=True,
                       capture_output=True)
        _write(OUT / "first_batches.csv", [_interrupted_run(common, data, Path(tmp) / "big")])


def _interrupted_run(common: list[str], data: Path, out: Path) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "run.py", *common, "--set", f"dataset.path={data}", "--set",
                             f"output.dir={out}", "--sweep-point", f"records={LINES},stopped"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    state = out / "state.json"
    while not state.exists() or json.loads(state.read_text() or "{}").get("batches", 0) < 2:
        if proc.poll() is not None:
            raise SystemExit(f"run.py exited with {proc.returncode} before two batches")
        time.sleep(0.05)
    seconds = time.monotonic() - start
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return {"dataset_lines": LINES, "second_batch_committed_s": round(seconds, 2), "exit_code": proc.returncode}


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
