"""Quality budgets (`kv.max_ppl_increase`, runner/plan/quality.py): the point picked from a real accuracy.csv
(written here in the eval harness's own format, and the committed SmolLM2 grid), the errors, and the line
`run.py` prints, through `--plan` (which loads no model)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner.job import JobError, load_job
from runner.kv.spec import KVSpec
from runner.plan.quality import GRIDS, choose
from runner.planner import resolve_quality
from runner.run_eval import ACCURACY_COLUMNS, kv_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
DENSE_PPL = 20.0
# (policy, sparsity, bits, perplexity, extra kv settings): increases over dense 20.0 are in the comments
POINTS = [
    ("dense", None, 16, DENSE_PPL, {}),
    ("dense", None, 8, 20.02, {}),  # +0.1%: dense is the reference, never a candidate
    ("swa", 0.5, 16, 20.2, {}),  # +1%
    ("swa", 0.5, 8, 20.3, {}),  # +1.5%
    ("swa", 0.8, 16, 20.8, {}),  # +4%
    ("swa", 0.8, 8, 21.2, {}),  # +6%
    ("swa", 0.9, 16, 24.0, {}),  # +20%
    ("swa", 0.9, 16, 20.1, {"score": "decay"}),  # an ablation: only a job with score: decay reads it
    ("h2o", 0.5, 16, 20.1, {}),  # +0.5%
]


def _write_grid(path: Path, points=POINTS, *, dtype: str = "float32", model: str = MODEL) -> Path:
    """An accuracy.csv as runner/run_eval.py writes it (its columns, its kv_config)."""
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ACCURACY_COLUMNS, restval="")
        if new:
            writer.writeheader()
        for policy, sparsity, bits, ppl, extra in points:
            kv = KVSpec(policy=policy, sparsity=sparsity, bits=bits, **extra)
            writer.writerow(dict(job="eval-test", task="perplexity", data="a.txt", model=model, dtype=dtype,
                                 kv_policy=policy, sparsity=sparsity or 0.0, bits=bits, mode="retain",
                                 metric="perplexity", value=ppl, tokens_scored=512, git_commit="0123456",
                                 kv_config=kv_config(kv), eval_config="context_len=256 prefill_len=128 windows=2"))
    return path


def _choose(grid: Path, budget: float, **kv) -> tuple:
    c = choose(KVSpec(max_ppl_increase=budget, accuracy_grid=str(grid), **kv), MODEL, None).chosen
    return c.policy, c.sparsity, c.bits


@pytest.mark.parametrize("budget, expected", [
    (0.012, ("swa", 0.5, 16)),  # 0.5 int8 (+1.5%) is over: fewer bits only within budget
    (0.015, ("swa", 0.5, 8)),  # at the budget exactly counts
    (0.05, ("swa", 0.8, 16)),  # higher sparsity first, then fewest bits
    (0.06, ("swa", 0.8, 8)),
    (0.5, ("swa", 0.9, 16)),
])
def test_the_highest_sparsity_then_fewest_bits_within_budget(tmp_path, budget, expected):
    assert _choose(_write_grid(tmp_path / "accuracy.csv"), budget) == expected


def test_the_jobs_policy_and_other_settings_pick_their_own_rows(tmp_path):
    grid = _write_grid(tmp_path / "accuracy.csv")
    assert _choose(grid, 0.01, policy="h2o") == ("h2o", 0.5, 16)
    assert _choose(grid, 0.01, policy="swa", score="decay") == ("swa", 0.9, 16)
    with pytest.raises(JobError, match=r"^kv.max_ppl_increase: .* no local perplexity points"):
        _choose(grid, 0.1, policy="local")


def test_the_chosen_line_names_the_increase_budget_grid_and_the_next_point(tmp_path):
    grid = _write_grid(tmp_path / "accuracy.csv")
    line = choose(KVSpec(max_ppl_increase=0.05, accuracy_grid=str(grid)), MODEL, None).line()
    assert line == (f"kv: swa sparsity 0.8 bits 16 chosen: perplexity +4.00% <= 5% budget ({grid}, {MODEL} "
                    "float32, 512 tokens, dense 20); sparsity 0.9 bits 16 was +20.00%")


def test_increases_are_against_the_dense_row_of_the_jobs_dtype_when_the_grid_has_it(tmp_path):
    grid = _write_grid(tmp_path / "accuracy.csv")
    _write_grid(grid, [("dense", None, 16, 10.0, {}), ("swa", 0.8, 16, 10.05, {})], dtype="bfloat16")
    assert choose(KVSpec(max_ppl_increase=0.01, accuracy_grid=str(grid)), MODEL, "bfloat16").chosen.sparsity == 0.8
    assert choose(KVSpec(max_ppl_increase=0.01, accuracy_grid=str(grid)), MODEL, "float16").chosen.sparsity == 0.5


def test_no_point_within_budget_is_one_line_naming_the_key_and_the_best_point(tmp_path):
    grid = _write_grid(tmp_path / "accuracy.csv")
    with pytest.raises(JobError, match=r"^kv.max_ppl_increase: no swa point .* within \+0.5% .* the best, "
                                       r"sparsity 0.5 bits 16 \(\+1.00%\)") as e:
        _choose(grid, 0.005)
    assert "\n" not in str(e.value)


def test_grid_errors_name_the_key(tmp_path):
    with pytest.raises(JobError, match=r"^kv.max_ppl_increase: no accuracy grid for model opt-30b .* eval job"):
        choose(KVSpec(max_ppl_increase=0.03), "opt-30b", None)
    with pytest.raises(JobError, match=r"^kv.accuracy_grid: cannot read"):
        _choose(tmp_path / "missing.csv", 0.03)
    with pytest.raises(JobError, match=r"^kv.accuracy_grid: .* no perplexity rows for model smollm2-135m"):
        _choose(ROOT / "results/eval/smollm2-mc/accuracy.csv", 0.03)
    no_dense = _write_grid(tmp_path / "no-dense.csv", POINTS[2:])
    with pytest.raises(JobError, match=r"^kv.accuracy_grid: .* no dense fp-KV perplexity row"):
        _choose(no_dense, 0.03)


@pytest.mark.parametrize("budget, expected", [
    (0.01, None), (0.03, None),  # SWA 50% INT8 is +3.02% over dense fp32 33.9737
    (0.1, ("swa", 0.8, 8)),  # +7.56%; 90% is +14.4%
])
def test_the_committed_smollm2_grid(budget, expected):
    kv = KVSpec(max_ppl_increase=budget)  # policy dense (the default) searches ALISA's SWA
    if expected is None:
        with pytest.raises(JobError, match=r"the best, sparsity 0.5 bits 8 \(\+3.02%\)"):
            choose(kv, MODEL, None)
        return
    c = choose(kv, MODEL, None)
    assert (c.chosen.policy, c.chosen.sparsity, c.chosen.bits) == expected
    grid = pd.read_csv(ROOT / GRIDS[MODEL], dtype=str)
    swa8 = grid[(grid.kv_config == '{"bits": 8, "policy": "swa", "sparsity": 0.8}')]
    assert c.chosen.perplexity == float(swa8.value.iloc[0]) and c.dense == 33.9737 and c.tokens == "4096"
    h2o = choose(KVSpec(policy="h2o", max_ppl_increase=0.03), MODEL, None).chosen
    assert (h2o.sparsity, h2o.bits, round(h2o.increase, 4)) == (0.5, 8, 0.0197)


@pytest.mark.parametrize("sets, message", [
    (["kv.max_ppl_increase=0"], "kv.max_ppl_increase: must be in (0, 1]"),
    (["kv.max_ppl_increase=1.5"], "kv.max_ppl_increase: must be in (0, 1]"),
    (["kv.max_ppl_increase=.nan"], "kv.max_ppl_increase: must be a finite number"),
    (["kv.max_ppl_increase=0.03", "kv.sparsity=0.8"], "kv.sparsity: picked by kv.max_ppl_increase"),
    (["kv.max_ppl_increase=0.03", "kv.bits=8"], "kv.bits: picked by kv.max_ppl_increase"),
    (["kv.accuracy_grid=a.csv"], "kv.accuracy_grid: only used with kv.max_ppl_increase"),
])
def test_budget_keys_are_validated_when_the_job_loads(sets, message):
    with pytest.raises(JobError, match=": " + message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_job(ROOT / "jobs/smollm2-135m.yaml", sets)
    assert e.value.key == message.split(":")[0]


def test_resolve_quality_replaces_the_kv_and_an_unresolved_budget_cannot_run():
    job = load_job(ROOT / "jobs/smollm2-135m.yaml", ["kv.max_ppl_increase=0.1"])
    with pytest.raises(JobError, match="^kv.max_ppl_increase: not resolved yet"):
        job.kv.settings()
    resolved, choice = resolve_quality(job)
    assert resolved.kv.label() == "swa s=0.8 retain int8" and resolved.kv.max_ppl_increase is None
    assert choice.budget == 0.1 and resolve_quality(resolved) == (resolved, None)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


_SYNTHETIC = ["hardware.profile=cpu-only", "dataset.format=synthetic", "dataset.path=jobs/data/synthetic-source.txt",
              "dataset.prompt_len=256", "dataset.template=null"]


def test_plan_prints_the_choice_and_records_it(tmp_path):
    out = _run("jobs/smollm2-135m.yaml", "--plan", *sum((["--set", s] for s in [
        *_SYNTHETIC, "kv.max_ppl_increase=0.1", f"output.dir={tmp_path}"]), []))
    assert out.returncode == 0, out.stderr
    assert ("# kv: swa sparsity 0.8 bits 8 chosen: perplexity +7.56% <= 10% budget "
            "(results/eval/smollm2-austen-ppl/accuracy.csv, smollm2-135m float32, 4096 tokens, dense 33.9737); "
            "sparsity 0.9 bits 8 was +14.41%") in out.stdout
    assert "kv swa s=0.8 retain int8" in out.stdout
    rows = pd.read_csv(tmp_path / "plan.csv")
    assert (rows["kv"] == "swa s=0.8 retain int8").all() and (rows["kv_max_ppl_increase"] == 0.1).all()


@pytest.mark.parametrize("flag", [["--plan"], []])
def test_a_budget_nothing_meets_fails_before_any_model_load(tmp_path, flag):
    out = _run("jobs/smollm2-135m.yaml", *flag, *sum((["--set", s] for s in [
        *_SYNTHETIC, "kv.max_ppl_increase=0.01", f"output.dir={tmp_path}"]), []))
    assert out.returncode == 2
    assert out.stderr.startswith("error: kv.max_ppl_increase: no swa point") and out.stderr.count("\n") == 1
    assert "+3.02%" in out.stderr and not (tmp_path / "throughput.csv").exists()


def test_a_run_prints_the_choice_and_its_row_records_the_kv_and_the_budget(tmp_path):
    out = _run("jobs/smollm2-135m.yaml", *sum((["--set", s] for s in [
        "kv.max_ppl_increase=0.1", f"output.dir={tmp_path}", "generation.max_new_tokens=4", "dataset.limit=2",
        "batch.gpu_batch_size=2"]), []))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("kv: swa sparsity 0.8 bits 8 chosen: perplexity +7.56% <= 10% budget")
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[-1]
    assert (row["kv_policy"], row["kv_sparsity"], row["kv_bits"], row["kv_max_ppl_increase"]) == ("swa", 0.8, 8, 0.1)
