"""The eval section (keys, values, grid) and the harness: CSV rows, resume, plot, run.py dispatch."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from runner import run_eval as harness
from runner.run_eval import ACCURACY_COLUMNS, grid_points, kv_label, read_rows, run_eval
from runner.eval.plot import plot_accuracy
from runner.eval.spec import EvalSpec
from runner.job import JobError, job_from_dict, load_job
from runner.kv.spec import KVSpec
from runner.run_job import RunError
from runner.model.weights import LoadedModel

REPO = Path(__file__).resolve().parents[1]


def eval_job(**eval_keys) -> dict:
    section = {"task": "perplexity", "data": ["a.txt"]}
    section.update(eval_keys)
    return {"name": "t", "model": {"name": "smollm2-135m"}, "eval": section}


# ---------------------------------------------------------------- the section

@pytest.mark.parametrize("job, key, detail", [
    (eval_job(polices=["local"]), "eval.polices", "unknown key"),
    (eval_job(task="summarize"), "eval.task", "perplexity, mc"),
    ({"name": "t", "model": {"name": "x"}, "eval": {"task": "mc"}}, "eval.data", "required"),
    (eval_job(data=[]), "eval.data", "at least one"),
    (eval_job(context_len=128, prefill_len=128), "eval.prefill_len", "< context_len"),
    (eval_job(windows=0), "eval.windows", ">= 1"),
    (eval_job(shots=2), "eval.shots", "only used with task: mc"),
    (eval_job(list_choices=True), "eval.list_choices", "only used with task: mc"),
    (eval_job(task="mc", data=["t.jsonl"], context_len=512), "eval.context_len", "only used with task: perplexity"),
    (eval_job(policies=["local"]), "eval.sparsities", "required"),
    (eval_job(policies=["local", "nope"], sparsities=[0.5]), "eval.policies[1]", "unknown policy"),
    (eval_job(policies=["dense"], sparsities=[0.5]), "eval.policies[0]", "always run"),
    (eval_job(policies=["local"], sparsities=[0.5, 1.5]), "eval.sparsities[1]", "[0, 1)"),
    (eval_job(policies=["local"], sparsities=["high"]), "eval.sparsities[0]", "must be a number"),
    (eval_job(bits=[16, 3]), "eval.bits[1]", "16, 8 or 4"),
    (eval_job(mode="drop"), "eval.mode", "retain, evict"),
    (eval_job(extra=[{"policy": "swa", "scroe": "decay"}], sparsities=[0.5]), "eval.extra[0].scroe", "unknown key"),
    (eval_job(extra=[{"policy": "swa", "score": "all"}], sparsities=[0.5]), "eval.extra[0].score", "h2o"),
    (eval_job(extra=[{"policy": "swa"}]), "eval.extra[0]", "sparsity or budget_tokens"),
    (eval_job(extra=["swa"]), "eval.extra[0]", "kv mapping"),
    ({**eval_job(), "dataset": {"path": "p.jsonl"}}, "dataset", "eval.data"),
    ({**eval_job(), "kv": {"policy": "swa"}}, "kv", "eval.policies"),
    ({**eval_job(), "engine": "hf"}, "engine", "alisa"),
])
def test_bad_eval_keys_and_values_name_the_key(job, key, detail):
    with pytest.raises(JobError) as e:
        job_from_dict(job)
    assert str(e.value).startswith(f"{key}: ") and detail in str(e.value)
    assert e.value.key == key


def test_grid_defaults_extras_and_round_trip():
    job = job_from_dict(eval_job(policies=["local", "swa"], sparsities=[0.5, 0.8], bits=[16, 8],
                                 extra=[{"policy": "swa", "score": "decay"}, {"policy": "h2o", "budget_tokens": 64},
                                        {"policy": "local", "sparsity": 0.5}]))
    spec = job.eval
    assert (spec.context_len, spec.prefill_len, spec.windows) == (2048, 1024, 8)
    grid = spec.grid()
    assert grid[:2] == [KVSpec(bits=16), KVSpec(bits=8)]
    assert grid[2] == KVSpec(policy="local", sparsity=0.5, bits=16)
    decay = [kv for kv in grid if kv.score == "decay"]
    assert [(kv.sparsity, kv.bits) for kv in decay] == [(0.5, 16), (0.5, 8), (0.8, 16), (0.8, 8)]
    assert [kv.bits for kv in grid if kv.budget_tokens == 64] == [16, 8]
    assert len(grid) == 2 + 2 * 2 * 2 + 4 + 2  # the local extra repeats two grid points: run once
    assert "decay" in kv_label(decay[0])
    assert job_from_dict(job.to_dict()) == job


def test_mc_points_are_per_file_and_shipped_jobs_load():
    spec = EvalSpec(task="mc", data=["a.jsonl", "b.jsonl"], policies=["local"], sparsities=[0.5])
    assert [(p.data, p.kv.policy) for p in grid_points(spec)] == [
        (("a.jsonl",), "dense"), (("a.jsonl",), "local"), (("b.jsonl",), "dense"), (("b.jsonl",), "local")]
    ppl = load_job(REPO / "jobs/eval/smollm2-austen-ppl.yaml")
    mc = load_job(REPO / "jobs/eval/smollm2-mc.yaml")
    assert ppl.eval.context_len == 2048
    # The grid (dense x bits, 5 policies x {0.5, 0.8, 0.9} x {16, 8}), plus SWA ablations.
    have = {(p.kv.policy, p.kv.sparsity, p.kv.bits) for p in grid_points(ppl.eval) if not p.kv.score
            and not p.kv.per_head and not p.kv.window}
    want = {("dense", None, b) for b in (16, 8)} | {
        (p, s, b) for p in ("local", "strided", "streaming", "h2o", "swa") for s in (0.5, 0.8, 0.9) for b in (16, 8)}
    assert have == want and len(grid_points(ppl.eval)) == 32 + 7  # decay x 3, per-head x 3, long window
    # MC: 16-bit KV only (INT8 is covered by the perplexity grid), every policy x sparsity, per task file.
    mc_have = {(p.kv.policy, p.kv.sparsity, p.kv.bits) for p in grid_points(mc.eval)}
    mc_want = {("dense", None, 16)} | {
        (p, s, 16) for p in ("local", "strided", "streaming", "h2o", "swa") for s in (0.5, 0.8, 0.9)}
    assert mc.eval.shots > 0 and len(mc.eval.data) >= 2 and mc_have == mc_want
    assert len(grid_points(mc.eval)) == 16 * len(mc.eval.data)


def test_missing_data_file_is_named(tmp_path):
    job = job_from_dict({**eval_job(data=[str(tmp_path / "here.txt"), str(tmp_path / "gone.txt")]),
                         "output": {"dir": str(tmp_path / "out")}})
    (tmp_path / "here.txt").write_text("text")
    with pytest.raises(RunError, match=r"^eval\.data\[1\]: file not found: .*gone\.txt$"):
        run_eval(job, progress=False)


# ---------------------------------------------------------------- resume, CSV, plot, run.py

@pytest.fixture
def counted_load(monkeypatch, smollm2_loaded):
    """harness.load_model returning the session's SmolLM2 (no second read of the GGUF); counts calls."""
    calls = []
    cfg, weights, tok = smollm2_loaded

    def load(**kwargs) -> LoadedModel:
        calls.append(kwargs)
        return LoadedModel(config=cfg, weights=weights, tokenizer=tok, source="test")

    monkeypatch.setattr(harness, "load_model", load)
    return calls


def tiny_job(tmp_path: Path, austen_text: str, **extra) -> dict:
    text = tmp_path / "book.txt"
    text.write_text(austen_text[:3000], encoding="utf-8")
    section = dict(task="perplexity", data=[str(text)], context_len=40, prefill_len=32, windows=2, batch_size=2)
    section.update(extra)
    return {"name": "tiny", "model": {"name": "smollm2-135m"}, "hardware": {"num_threads": 1},
            "output": {"dir": str(tmp_path / "out")}, "eval": section}


def test_resume_skips_done_points(tmp_path, austen_text, counted_load):
    before = torch.get_num_threads()
    try:
        first = run_eval(job_from_dict(tiny_job(tmp_path, austen_text)), progress=False)  # dense only
        assert (first.computed, first.skipped, len(counted_load)) == (1, 0, 1)
        with first.csv.open("a", encoding="utf-8") as f:
            f.write("tiny,perplexity,book.txt,smollm2")  # a crash in the middle of writing a row
        grid = tiny_job(tmp_path, austen_text, policies=["local"], sparsities=[0.5])
        second = run_eval(job_from_dict(grid), progress=False)
        assert (second.computed, second.skipped, len(counted_load)) == (1, 1, 2)
        third = run_eval(job_from_dict(grid), progress=False)
        assert (third.computed, third.skipped, len(counted_load)) == (0, 2, 2)  # nothing computed, model not loaded
    finally:
        torch.set_num_threads(before)
    with third.csv.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == list(ACCURACY_COLUMNS)
    rows = read_rows(third.csv)
    assert [(r["kv_policy"], r["metric"]) for r in rows] == [("dense", "perplexity"), ("local", "perplexity")]
    assert rows == third.rows
    dense, local = (float(r["value"]) for r in rows)
    assert 1 < dense < local
    assert rows[0]["tokens_scored"] == "16" and rows[0]["sparsity"] == "0.0" and rows[1]["sparsity"] == "0.5"
    assert third.png.stat().st_size > 10_000 and third.png.read_bytes()[:4] == b"\x89PNG"


def test_foreign_csv_stops_before_any_work(tmp_path, austen_text, counted_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "accuracy.csv").write_text("job,value\nold,1.0\n", encoding="utf-8")
    with pytest.raises(RunError, match="accuracy.csv: written by another version"):
        run_eval(job_from_dict(tiny_job(tmp_path, austen_text)), progress=False)
    assert counted_load == []


def test_run_py_dispatches_eval(tmp_path, austen_text, counted_load, capsys):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(tmp_path, austen_text, windows=1)), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("run_cli", REPO / "run.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    before = torch.get_num_threads()
    try:
        assert cli.main([str(path)]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "dense" in out and "perplexity" in out and "1 points run, 0 already in" in out
    assert (tmp_path / "out" / "accuracy.png").is_file() and (tmp_path / "out" / "job.yaml").is_file()
    assert cli.main([str(path), "--set", "eval.polices=[local]"]) == 2
    assert "eval.polices: unknown key" in capsys.readouterr().err


def test_plot_panels_for_mc_rows(tmp_path):
    rows = []
    for data in ("a.jsonl", "b.jsonl"):
        for metric in ("acc", "acc_norm"):
            for bits in (16, 8):
                rows.append(dict(data=data, metric=metric, kv_policy="dense", sparsity="0.0", bits=bits, value=0.6,
                                 kv_config='{"policy": "dense"}'))
                for s, v in ((0.5, 0.58), (0.9, 0.5)):
                    rows.append(dict(data=data, metric=metric, kv_policy="swa", sparsity=s, bits=bits, value=v,
                                     kv_config=f'{{"policy": "swa", "sparsity": {s}, "score": "decay"}}'))
    path = plot_accuracy(rows, tmp_path / "accuracy.png", title="model: mc")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 20_000
    assert plot_accuracy([], tmp_path / "empty.png", title="nothing yet").is_file()
