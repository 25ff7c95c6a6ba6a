"""Per-batch reports of real runs: batches.csv rows add up to the run's throughput row, the executor's
tier peaks are recorded, report.png is written; BatchLog refuses unknown columns."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner.data.reports import BATCH_COLUMNS, BatchLog

ROOT = Path(__file__).resolve().parents[1]


def _run(job: str, out: Path, *sets: str) -> None:
    args = [a for s in (f"output.dir={out}", *sets) for a in ("--set", s)]
    done = subprocess.run([sys.executable, "run.py", job, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("job, sets, blocks", [
    ("jobs/smollm2-135m.yaml", ("dataset.limit=5", "batch.gpu_batch_size=2", "generation.max_new_tokens=6"), 3),
    ("jobs/offload-smollm2.yaml", ("generation.max_new_tokens=6",), 1),
], ids=["plain", "executor"])
def test_batches_csv_adds_up_to_the_run_and_the_report_is_drawn(tmp_path, job, sets, blocks):
    _run(job, tmp_path, *sets)
    batches = pd.read_csv(tmp_path / "batches.csv")
    run = pd.read_csv(tmp_path / "throughput.csv").iloc[-1]
    assert list(batches.columns) == list(BATCH_COLUMNS)
    assert list(batches["batch"]) == list(range(blocks))
    assert batches["prompts"].sum() == run["num_prompts"]
    assert batches["prefill_s"].sum() == pytest.approx(run["prefill_latency_s"], abs=1e-5)
    assert batches["decode_s"].sum() == pytest.approx(run["decode_latency_s"], abs=1e-5)
    assert batches["elapsed_s"].is_monotonic_increasing and (batches["peak_rss_bytes"] > 0).all()
    if "offload" in job:
        assert (batches["peak_gpu_pool_bytes"] > 0).all() and (batches["peak_disk_bytes"] > 0).all()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_log_appends_after_a_resumed_runs_rows_and_refuses_unknown_columns(tmp_path):
    path = tmp_path / "batches.csv"
    log = BatchLog(path)
    log.append({"prompts": 2, "generated_tokens": 10, "elapsed_s": 4.0})
    with pytest.raises(ValueError, match="unknown batch columns"):
        log.append({"tokens": 3})
    resumed = BatchLog(path, start=1)  # a resumed run: numbering and the time axis go on
    assert resumed.elapsed_before == 4.0
    resumed.append({"prompts": 2, "generated_tokens": 12, "elapsed_s": 5.0})
    rows = pd.read_csv(path)
    assert list(rows["batch"]) == [0, 1] and list(rows["generated_tokens"]) == [10, 12]
