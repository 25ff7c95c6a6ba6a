"""Planner: `--plan` on a job whose weights are not here, its pasteable YAML, `offload: auto`, and the
predicted columns of a real run's CSV row."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.job import JobError, load_job
from runner.planner import plan_job, plan_sections, resolve_auto

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_plan_prints_both_searched_plans_for_opt30b_without_its_weights(tmp_path):
    assert not (ROOT / "models/opt-30b").exists()
    out = _run("jobs/opt30b.yaml", "--plan", "--set", f"output.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "## alisa (searched)" in text and "## flexgen (searched)" in text
    assert "predicted tokens/s" in text and "peak memory" in text
    # Each printed plan is YAML a user can paste into the job.
    blocks = ["\n".join(line for line in b.splitlines()[1:] if not line.startswith(("#", "plan rows")))
              for b in text.split("## ")[2:] if "no plan fits" not in b]
    assert blocks
    for block in blocks:
        sections = yaml.safe_load(block)
        job = load_job(ROOT / "jobs/opt30b.yaml", [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                                   for k, v in sections.items()])
        assert job.offload is not None and job.batch.gpu_batch_size == sections["batch"]["gpu_batch_size"]
    import pandas as pd
    rows = pd.read_csv(tmp_path / "plan.csv", dtype={"git_commit": str})  # an all-digit hash must stay a string
    assert list(rows["candidate"]) == ["job", "alisa", "flexgen"] and rows["predicted_total_throughput"].notna().all()
    from runner.data.outputs import git_commit
    assert (rows["git_commit"] == git_commit()).all() and (rows["dtype"] == "float16").all()  # t4-16g plans fp16


def test_plan_without_a_profile_is_a_one_line_error():
    out = _run("jobs/smollm2-135m.yaml", "--plan")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: hardware.profile:") and out.stderr.count("\n") == 1


def test_unknown_profile_fails_when_the_job_loads():
    with pytest.raises(JobError, match="hardware.profile: unknown profile 'no-such'"):
        load_job(ROOT / "jobs/opt30b.yaml", ["hardware.profile=no-such"])


def test_offload_auto_needs_a_profile_and_resolves_to_a_concrete_plan():
    with pytest.raises(JobError, match="hardware.profile: required with offload: auto"):
        load_job(ROOT / "jobs/offload-smollm2.yaml", ["offload=auto", "hardware.profile=null"])
    with pytest.raises(JobError, match="batch: auto: the plan search picks the batch shape with offload: auto"):
        load_job(ROOT / "jobs/opt30b.yaml", ["batch=auto"])
    fixed = resolve_auto(load_job(ROOT / "jobs/opt30b.yaml", ["offload=auto"]))
    assert (fixed.batch.gpu_batch_size, fixed.batch.num_gpu_batches) == (48, 3)  # the job's batch is kept
    job = load_job(ROOT / "jobs/opt30b.yaml", ["offload=auto", "batch=auto"])
    assert job.auto_offload and job.to_dict()["offload"] == "auto" and job.to_dict()["batch"] == "auto"
    resolved = resolve_auto(job)
    assert not resolved.auto_offload and resolved.offload is not None
    report = plan_job(job)
    best = max((r for r in (report.alisa, report.flexgen) if r), key=lambda r: r.prediction.total_throughput)
    assert plan_sections(best.plan)["batch"]["gpu_batch_size"] == resolved.batch.gpu_batch_size


def test_a_real_run_row_carries_the_prediction(tmp_path):
    out = _run("jobs/smollm2-135m.yaml", "--set", f"output.dir={tmp_path}", "--set", "generation.max_new_tokens=4",
               "--set", "dataset.limit=2", "--set", "batch.gpu_batch_size=2")
    assert out.returncode == 0, out.stderr
    import pandas as pd
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[-1]
    assert row["predicted_profile"] == "cpu-only"
    assert row["predicted_total_throughput"] > 0


@pytest.mark.parametrize("bits", [8, 16])
def test_the_flexgen_plan_compresses_whatever_the_jobs_kv(bits):
    """The ALISA-paper job (OPT-30B on h100-80g, batch 64, 128/512, SWA 0.8): FlexGen's comparison plan is
    searched over FlexGen's whole policy space, so it stores its KV with FlexGen's 4-bit cache (16-bit KV
    does not fit beside the weights) whether the job's own KV is INT8 or 16-bit (the old planner
    compressed only for INT8 jobs)."""
    job = load_job(ROOT / "jobs/plan/alisa-h100-trend.yaml", [f"kv.bits={bits}"])
    point = next(j for p, j in job.sweep_points() if p["kv.sparsity"] == 0.8)
    report = plan_job(point)
    assert report.flexgen is not None
    assert report.flexgen.plan.offload.compress_cache


def test_offload_auto_plans_an_evict_job_with_flexgens_split():
    """Token placement cannot compact slots, so `offload: auto` on a kv.mode: evict job searches FlexGen's
    per-sequence split, sized and priced at the kept budget + 1 slots (before, no plan was searched at all)."""
    job = load_job(ROOT / "jobs/opt30b.yaml", ["offload=auto", "kv={policy: h2o, sparsity: 0.8, mode: evict}"])
    resolved = resolve_auto(job)
    assert resolved.offload.kv_placement.value == "sequence" and resolved.kv.mode.value == "evict"
    assert (resolved.batch.gpu_batch_size, resolved.batch.num_gpu_batches) == (48, 3)  # the job's batch is kept
