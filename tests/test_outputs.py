from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from runner.data.outputs import (
    OFFLOAD_COLUMNS, RETIRED_COLUMNS, THROUGHPUT_COLUMNS, FinishReason, GenerationRecord, append_csv_row, git_commit,
    peak_rss_bytes, throughput_row,
)
from runner.resume import append_lines


def record(i: int, reason: str = "length") -> GenerationRecord:
    return GenerationRecord(id=f"p{i}", prompt=f"Prompt {i} — café", completion=" done\n",
                            completion_token_ids=[i, 2], finish_reason=reason)


def test_generations_lines_exact_keys_and_append(tmp_path):
    # As the run loop writes them: each record's to_json() appended as one line.
    path = tmp_path / "generations.jsonl"
    append_lines(path, (r.to_json() for r in [record(1), record(2, "eos")]), durable=False)
    append_lines(path, (r.to_json() for r in iter([record(3, FinishReason.STOP)])), durable=True)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert "café" in lines[0]  # ensure_ascii=False
    rows = [json.loads(line) for line in lines]
    assert list(rows[0]) == ["id", "prompt", "completion", "completion_token_ids", "finish_reason"]
    assert rows[0] == {"id": "p1", "prompt": "Prompt 1 — café", "completion": " done\n",
                       "completion_token_ids": [1, 2], "finish_reason": "length"}
    assert [r["finish_reason"] for r in rows] == ["length", "eos", "stop"]


def test_bad_finish_reason():
    with pytest.raises(ValueError, match=r"record 'p1': finish_reason must be one of eos, stop, length"):
        record(1, "timeout")


def test_throughput_math_by_hand():
    # 4 prompts of 10 tokens, 5 generated tokens each; prefill 0.5 s, decode 2 s.
    row = throughput_row(prefill_latency_s=0.5, decode_latency_s=2.0, num_prompts=4, prompt_tokens=40,
                         generated_tokens=20, job="j", gpu_batch_size=4)
    assert row["prompt_len"] == 10.0 and row["gen_len"] == 5.0
    assert row["prefill_throughput"] == 80.0  # 40 / 0.5
    assert row["decode_throughput"] == 8.0  # 4 * (5 - 1) / 2
    assert row["total_latency_s"] == 2.5
    assert row["total_throughput"] == 8.0  # 20 / 2.5
    assert row["job"] == "j" and row["gpu_batch_size"] == 4
    assert list(row) == [c for c in THROUGHPUT_COLUMNS if c in row]


def test_throughput_variable_lengths_round_and_zero_latency():
    row = throughput_row(prefill_latency_s=0.3, decode_latency_s=0.0, num_prompts=3, prompt_tokens=10,
                         generated_tokens=3)
    assert row["prompt_len"] == 3.33 and row["gen_len"] == 1.0
    assert row["prefill_throughput"] == 33.33
    assert row["decode_throughput"] == 0.0  # guarded division
    assert throughput_row(prefill_latency_s=0, decode_latency_s=0, num_prompts=0, prompt_tokens=0,
                          generated_tokens=0)["total_throughput"] == 0.0


def test_throughput_row_rejects_unknown_and_computed_fields():
    args = dict(prefill_latency_s=1, decode_latency_s=1, num_prompts=1, prompt_tokens=1, generated_tokens=1)
    with pytest.raises(ValueError, match="unknown columns"):
        throughput_row(**args, speed=3)
    with pytest.raises(ValueError, match="computed"):
        throughput_row(**args, total_throughput=3)


def test_csv_append_twice_header_once(tmp_path):
    path = tmp_path / "results" / "throughput.csv"
    first = throughput_row(prefill_latency_s=0.5, decode_latency_s=2.0, num_prompts=4, prompt_tokens=40,
                           generated_tokens=20, job="a", engine="alisa", notes="has, comma")
    append_csv_row(path, first)
    append_csv_row(path, {"job": "b", "gpu_batch_size": 8})
    text = path.read_text(encoding="utf-8")
    assert text.count("job,engine,model") == 1
    df = pd.read_csv(path)
    assert list(df.columns) == list(THROUGHPUT_COLUMNS)
    assert len(df) == 2
    assert df["job"].tolist() == ["a", "b"]
    assert df.loc[0, "total_throughput"] == 8.0 and df.loc[0, "notes"] == "has, comma"
    assert pd.isna(df.loc[1, "total_throughput"])  # missing keys are empty cells


def test_csv_header_written_for_empty_existing_file(tmp_path):
    path = tmp_path / "t.csv"
    path.touch()
    append_csv_row(path, {"job": "x"})
    assert path.read_text().splitlines()[0] == ",".join(THROUGHPUT_COLUMNS)


def test_csv_header_mismatch_is_refused_without_touching_the_file(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("job,model,throughput\nx,y,1\n")
    with pytest.raises(ValueError, match=r"old.csv: existing header has columns this version does not know "
                                         r"\(\['throughput'\]\)"):
        append_csv_row(path, {"job": "x"})
    assert path.read_text() == "job,model,throughput\nx,y,1\n"


def test_csv_written_by_an_older_version_is_upgraded_keeping_its_rows(tmp_path):
    # An older version had fewer columns; its rows must survive under the new header.
    path = tmp_path / "old.csv"
    path.write_text("job,model,decode_throughput\nold,m1,12.5\n")
    append_csv_row(path, {"job": "new", "model": "m2", "kv_bits": 8})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(THROUGHPUT_COLUMNS)
    assert (rows[0]["job"], rows[0]["model"], rows[0]["decode_throughput"], rows[0]["kv_bits"]) == ("old", "m1", "12.5", "")
    assert (rows[1]["job"], rows[1]["kv_bits"]) == ("new", "8")


def test_csv_unknown_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown throughput columns \['tokens_per_s'\]"):
        append_csv_row(tmp_path / "t.csv", {"job": "x", "tokens_per_s": 3})
    assert not (tmp_path / "t.csv").exists()


def test_offload_columns_are_declared_so_runs_with_and_without_them_share_one_header(tmp_path):
    # The names the executor reports (issue 4's time and phase breakdowns) and the job's link.
    expected = {"link_gbps", "link_emulated", "peak_gpu_pool_bytes", "bytes_disk_read", "transfer_wait_s",
                "recompute_s", "link_busy_gpu_from_cpu_s", "link_busy_cpu_from_gpu_s", "phase1_s",
                "phase2_s", "phase3_s", "kv_bytes_gpu_from_cpu", "kv_bytes_cpu_from_gpu"}
    assert expected <= set(OFFLOAD_COLUMNS) <= set(THROUGHPUT_COLUMNS)
    assert len(set(THROUGHPUT_COLUMNS)) == len(THROUGHPUT_COLUMNS) and THROUGHPUT_COLUMNS[-1] == "notes"
    args = dict(prefill_latency_s=1, decode_latency_s=1, num_prompts=1, prompt_tokens=1, generated_tokens=2)
    path = tmp_path / "t.csv"
    append_csv_row(path, throughput_row(**args, job="plain"))
    append_csv_row(path, throughput_row(**args, job="offload", transfer_wait_s=0.25, phase2_s=1.5,
                                        link_gbps=0.02, link_emulated=True))
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(THROUGHPUT_COLUMNS)
    assert rows[0]["transfer_wait_s"] == "" and rows[0]["link_gbps"] == ""
    assert (rows[1]["transfer_wait_s"], rows[1]["phase2_s"], rows[1]["link_emulated"]) == ("0.25", "1.5", "True")
    assert rows[1]["recompute_s"] == ""  # declared but not reported by this run


def test_csv_with_an_empty_retired_column_is_upgraded_without_it(tmp_path):
    # compute_s was declared but never filled: committed CSVs carry it, empty; appending drops it.
    assert "compute_s" in RETIRED_COLUMNS and not RETIRED_COLUMNS & set(THROUGHPUT_COLUMNS)
    path = tmp_path / "old.csv"
    path.write_text("job,transfer_wait_s,compute_s,recompute_s\nold,0.5,,0.25\n")
    append_csv_row(path, {"job": "new", "recompute_s": 1.0})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(THROUGHPUT_COLUMNS)
    assert [(r["job"], r["transfer_wait_s"], r["recompute_s"]) for r in rows] == [("old", "0.5", "0.25"),
                                                                               ("new", "", "1.0")]


def test_csv_with_a_filled_retired_column_is_refused_without_touching_the_file(tmp_path):
    path = tmp_path / "old.csv"
    text = "job,compute_s\nold,\nodd,1.5\n"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"old.csv: retired columns \['compute_s'\] hold values"):
        append_csv_row(path, {"job": "new"})
    assert path.read_text() == text


def test_undeclared_executor_column_points_at_the_declaration():
    args = dict(prefill_latency_s=1, decode_latency_s=1, num_prompts=1, prompt_tokens=1, generated_tokens=1)
    with pytest.raises(ValueError, match=r"unknown columns \['phase4_s'\].*OFFLOAD_COLUMNS"):
        throughput_row(**args, phase4_s=1.0)


def test_git_commit_clean_dirty_and_unknown(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    assert git_commit(tmp_path) == "unknown"  # no commits yet
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("ignored for dirtiness")
    assert git_commit(tmp_path) == head
    (tmp_path / "results" / "bench").mkdir(parents=True)  # a committed CSV a benchmark appends to
    (tmp_path / "results" / "bench" / "t.csv").write_text("a\n")
    git("add", "results")
    git("commit", "-q", "-m", "rows")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "results" / "bench" / "t.csv").write_text("a\n1\n")
    sub = tmp_path / "sub"  # asked from a folder below the top, as runner/data asks
    sub.mkdir()
    assert git_commit(sub) == git_commit(tmp_path) == head  # results/ changes are not code changes
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == f"{head}-dirty"
    assert re.fullmatch(r"unknown|[0-9a-f]{4,40}(-dirty)?", git_commit())


def test_peak_rss():
    rss = peak_rss_bytes()
    assert rss > 10 * 2**20  # a Python process with pandas loaded is well over 10 MiB


def test_peak_rss_is_the_process_own_not_inherited_from_its_parent():
    """A run started by a big parent (a pytest session, a sweep driver) reports its own peak: ru_maxrss
    would start at the parent's peak at fork, which is why peak_rss_bytes reads VmHWM."""
    import sys
    big = bytearray(800 * 2 ** 20)  # touched: resident in this (parent) process
    big[:: 4096] = b"\x01" * len(big[:: 4096])
    child = subprocess.run([sys.executable, "-c", "from runner.data.outputs import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert peak_rss_bytes() > 800 * 2 ** 20 > int(child.stdout) > 0
    del big
