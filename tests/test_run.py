"""`run.py` end to end, as a user runs it: a real subprocess, real files, both engines."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from runner.data.outputs import THROUGHPUT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _job(tmp_path: Path, engine: str) -> list[str]:
    return ["jobs/smollm2-135m.yaml", "--set", f"engine={engine}", "--set", "dataset.limit=3",
            "--set", "generation.max_new_tokens=12", "--set", "batch.gpu_batch_size=2",
            "--set", f"output.dir={tmp_path / engine}", "--set", f"output.csv={tmp_path / 'throughput.csv'}"]


def test_main_job_both_engines_same_greedy_outputs(tmp_path, smollm2_gguf_path):
    # fp32 on both sides: `dtype: auto` is bf16 for our engine on a CPU with native bf16, whose greedy
    # tokens part from fp32's at near-ties (results/eval/smollm2-dtype-generations/compare.csv).
    for engine in ("alisa", "hf"):
        proc = _run(*_job(tmp_path, engine), "--set", "model.dtype=float32")
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "throughput.csv")
    assert list(rows.columns) == list(THROUGHPUT_COLUMNS)
    assert list(rows.engine) == ["alisa", "hf"]
    assert (rows.num_prompts == 3).all() and (rows.total_throughput > 0).all()
    assert (rows.peak_cpu_bytes > 100e6).all()
    from runner.model import kernels  # our greedy tokens came through the bf16 screen wherever it pays
    screened = kernels.bf16_screen(torch.device("cpu"), torch.float32)
    assert rows.greedy_head.fillna("").tolist() == ["bf16-screen" if screened else "full", ""]
    ours, hf = ([json.loads(line) for line in (tmp_path / e / "generations.jsonl").read_text().splitlines()]
                for e in ("alisa", "hf"))
    assert [r["id"] for r in ours] == ["p01", "p02", "p03"]
    for a, b in zip(ours, hf):
        assert a["completion_token_ids"] == b["completion_token_ids"]
        assert a["completion"] == b["completion"] and a["completion"].strip()
        assert a["finish_reason"] == b["finish_reason"]
    assert (tmp_path / "alisa" / "job.yaml").is_file()


@pytest.mark.parametrize("override, key", [
    ("generation.temprature=1", "generation.temprature"),
    ("batch.gpu_batch_size=0", "batch.gpu_batch_size"),
    ("model.path=/nonexistent/opt", "model.path"),
    ("kv.policy=nope", "kv.policy"),
])
def test_bad_input_is_one_line_error_naming_the_key(tmp_path, override, key):
    proc = _run("jobs/smollm2-135m.yaml", "--set", f"output.dir={tmp_path}", "--set", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr


def test_planted_bad_records_are_rejected_and_counted_and_the_job_goes_on(tmp_path):
    data = tmp_path / "p.jsonl"
    good = [json.dumps({"id": f"g{i}", "prompt": f"Say the number {i}."}) for i in range(3)]
    bad = ['{"id": "j", "prompt": ', json.dumps({"id": "m", "text": "no prompt field"}), json.dumps({"id": "e", "prompt": " "}),
           json.dumps({"id": "n", "prompt": 7}), json.dumps({"id": "g0", "prompt": "duplicate id"}),
           json.dumps({"id": "long", "prompt": "word " * 9000})]
    lines = [good[0], bad[0], bad[1], good[1], bad[2], bad[3], bad[4], bad[5], good[2]]
    data.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "u", "prompt": "caf\xe9"}\n')
    args = ["jobs/smollm2-135m.yaml", "--set", f"dataset.path={data}", "--set", f"output.dir={tmp_path / 'out'}",
            "--set", "generation.max_new_tokens=4", "--set", "dataset.template=null"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "7 records rejected" in proc.stdout
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r["reason"] for r in rejects}
    assert sorted(by_line) == [2, 3, 5, 6, 7, 8, 10]
    for line, words in {2: "invalid JSON", 3: "missing field", 5: "empty", 6: "must be a string", 7: "duplicate id",
                        8: "context", 10: "UTF-8"}.items():
        assert words in by_line[line], (line, by_line[line])
    outputs = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs] == ["g0", "g1", "g2"]
    row = pd.read_csv(tmp_path / "out" / "throughput.csv").iloc[0]
    assert row.num_prompts == 3 and row.rejected_prompts == 7 and row.status == "complete"
    strict = _run(*args, "--set", "dataset.on_error=fail", "--set", f"output.dir={tmp_path / 'strict'}")
    assert strict.returncode == 2  # the last stderr line says it all, after the progress bar
    assert strict.stderr.strip().splitlines()[-1].startswith("error: ") and f"{data}:2: invalid JSON" in strict.stderr


def test_length_bucketing_keeps_outputs_keyed_and_in_dataset_order(tmp_path):
    base = ["jobs/smollm2-135m.yaml", "--set", "generation.max_new_tokens=4", "--set", "batch.gpu_batch_size=2",
            "--set", "dataset.bucket=8"]
    ordered = _run(*base, "--set", f"output.dir={tmp_path / 'dataset'}")
    by_length = _run(*base, "--set", f"output.dir={tmp_path / 'completion'}", "--set", "output.order=completion")
    assert ordered.returncode == 0 and by_length.returncode == 0, ordered.stderr[-2000:] + by_length.stderr[-2000:]
    a, b = ([json.loads(x) for x in (tmp_path / d / "generations.jsonl").read_text().splitlines()]
            for d in ("dataset", "completion"))
    assert [r["index"] for r in a] == list(range(16))
    assert [r["index"] for r in b] != list(range(16)) and sorted(r["index"] for r in b) == list(range(16))
    assert {r["id"]: r["completion"] for r in a} == {r["id"]: r["completion"] for r in b}
    for window in (b[:8], b[8:]):  # sorted by prompt length inside each window of 8 records
        lengths = [len(r["prompt"]) for r in window]
        assert sorted(r["index"] for r in window) == sorted(range(window[0]["index"] // 8 * 8,
                                                                  window[0]["index"] // 8 * 8 + 8))
        assert lengths[0] <= lengths[-1]


def test_sweep_writes_one_row_per_point(tmp_path):
    proc = _run("jobs/smollm2-135m.yaml", "--set", "model.path=dummy", "--set", "model.name=opt-125m",
                "--set", "dataset.limit=2", "--set", "generation.max_new_tokens=3", "--set", "generation.ignore_eos=true",
                "--set", f"output.dir={tmp_path}", "--set", "sweep={batch.gpu_batch_size: [1, 2]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "throughput.csv")
    assert list(rows.gpu_batch_size) == [1, 2] and (rows.gen_len == 3).all()
    assert list(rows.sweep_point) == ["batch.gpu_batch_size=1", "batch.gpu_batch_size=2"]


def test_impossible_memory_budget_is_refused_up_front_and_evict_fits(tmp_path):
    # 64 x (1024 + 32) tokens of dense fp32 KV is 2.9 GiB: more than 2 GiB minus the weights.
    base = ["jobs/bench/evict-memory.yaml", "--set", "sweep={}", "--set", "batch.gpu_batch_size=64",
            "--set", "generation.max_new_tokens=2", "--set", f"output.dir={tmp_path}"]
    proc = _run(*base, "--set", "kv={policy: dense}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: batch.gpu_batch_size: 64 sequences"), proc.stderr
    assert "hardware.memory_gib (2 GiB" in lines[0] and "kv.mode: evict" in lines[0]
    assert not (tmp_path / "throughput.csv").exists()


def test_kv_policy_row_records_settings_and_phase_times(tmp_path):
    proc = _run(*_job(tmp_path, "alisa"), "--set", "kv={policy: swa, sparsity: 0.5, bits: 8, profile: true}",
                "--set", "model.dtype=float32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[0]
    assert (row.kv_policy, row.kv_sparsity, row.kv_bits, row.kv_mode) == ("swa", 0.5, 8, "retain")
    assert row.kv_bytes_per_token == 30 * 2 * 3 * (64 + 2 * 4)  # int8 codes + fp32 scale and min per head
    assert row.kv_peak_bytes > 0 and row.kv_attend_s > 0 and row.kv_gather_s >= 0
    proc = _run(*_job(tmp_path, "alisa"), "--set", "generation.do_sample=true", "--fresh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pd.isna(pd.read_csv(tmp_path / "throughput.csv").iloc[-1].greedy_head)  # sampling: no greedy head


def test_offload_row_states_the_link_and_emulation_costs_its_time(tmp_path):
    # Dummy OPT-125m, weights 60/20/20 gpu/cpu/disk (qkv and fc1 land on cpu, the norms on disk, read without
    # page cache): an emulated 0.15 GB/s link must make the run last as long as its ~0.4 GB of gpu<-cpu
    # bytes take on that link, 2.6 s (without emulation the run takes ~0.9 s on 2 CPU cores).
    gbps = 0.15
    proc = _run("jobs/smollm2-135m.yaml", "--set", "model.path=dummy", "--set", "model.name=opt-125m",
                "--set", "dataset.limit=2", "--set", "batch.gpu_batch_size=2", "--set", "generation.max_new_tokens=2",
                "--set", "generation.ignore_eos=true", "--set", f"output.dir={tmp_path}", "--set", "hardware.num_threads=1",
                "--set", "offload={w_gpu_percent: 60, w_cpu_percent: 20}", "--set", "hardware.disk_page_cache=false",
                "--set", f"hardware.offload_dir={tmp_path / 'offload'}",
                "--set", f"hardware.link.gbps={gbps}", "--set", "hardware.link.emulate=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[0]
    assert (row.link_gbps, row.link_emulated) == (gbps, True)
    assert row.bytes_disk_read > 0 and row.bytes_gpu_from_cpu > 0
    # Every counted byte crossed the link inside the timed run: the one untimed copy, the prefetch of the
    # next token's first layer after the last step, moves nothing (the embedding unit is all on gpu here).
    assert row.total_latency_s >= 0.9 * row.bytes_gpu_from_cpu / (gbps * 1e9)
    assert not any((tmp_path / "offload").iterdir())  # the disk files are gone


@pytest.mark.parametrize("key, value", [
    ("output.dir", "/proc/alisa-runner-test/out"),  # procfs: nothing can be created there
    ("hardware.offload_dir", "/proc/alisa-runner-test/offload"),
    ("output.csv", "/proc/alisa-runner-test.csv"),  # the row is written last: found before the work, not after
])
def test_unusable_output_or_offload_dir_is_refused_before_work(tmp_path, key, value):
    sets = {"output.dir": str(tmp_path / "out"), "offload": "{w_gpu_percent: 100}", key: value}
    proc = _run("jobs/smollm2-135m.yaml", *sum((["--set", f"{k}={v}"] for k, v in sets.items()), []))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: cannot create"), proc.stderr


def test_a_million_line_dataset_streams_first_batch_in_seconds_at_flat_memory(tmp_path):
    """The run reads records lazily: its first batch commits seconds after the model loads, and its peak
    RSS is that of a run over four records. Stopped with SIGINT after two batches (1M would take days)."""
    data = tmp_path / "big.jsonl"
    with data.open("w") as f:
        f.writelines(f'{{"id": "q{i}", "prompt": "Count to {i % 97}."}}\n' for i in range(1_000_000))
    common = ["jobs/smollm2-135m.yaml", "--set", f"dataset.path={data}", "--set", "generation.max_new_tokens=4",
              "--set", "batch.gpu_batch_size=2"]
    small = _run(*common, "--set", "dataset.limit=4", "--set", f"output.dir={tmp_path / 'small'}")
    assert small.returncode == 0, small.stderr[-2000:]
    out = tmp_path / "big"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "run.py", *common, "--set", f"output.dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    state = out / "state.json"
    while not state.exists() or json.loads(state.read_text() or "{}").get("batches", 0) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < 120
        time.sleep(0.05)
    first_batches_s = time.monotonic() - start
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    big_row = pd.read_csv(out / "throughput.csv").iloc[0]
    small_row = pd.read_csv(tmp_path / "small" / "throughput.csv").iloc[0]
    assert big_row.status == "interrupted" and big_row.num_prompts >= 4
    print(f"two batches committed {first_batches_s:.1f} s after start (model load included); peak RSS "
          f"{big_row.peak_cpu_bytes / 2**20:.0f} MiB over 1M lines vs {small_row.peak_cpu_bytes / 2**20:.0f} MiB over 4")
    assert big_row.peak_cpu_bytes - small_row.peak_cpu_bytes < 64 * 2 ** 20


def test_a_model_that_does_not_fit_runs_offloaded_in_bf16(tmp_path):
    """hardware.memory_gib 0.2 holds neither SmolLM2's fp32 weights (0.54 GB) nor its bf16 ones (0.27 GB):
    the plain job turns bf16 (this CPU has native bf16 dot products) and `offload: auto` on the cpu-only
    profile limited to 0.2 GiB, and runs; the resolved job.yaml says which plan ran."""
    from runner.model import kernels
    if not kernels.native_bf16():
        pytest.skip("dtype auto picks bf16 only on a CPU with native bf16 dot products")
    proc = _run("jobs/smollm2-135m.yaml", "--set", "hardware.memory_gib=0.2", "--set", "dataset.limit=2",
                "--set", "generation.max_new_tokens=4", "--set", f"output.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[-1]
    assert row["dtype"] == "bfloat16" and row.num_prompts == 2 and row.gen_len == 4
    import yaml
    ran = yaml.safe_load((tmp_path / "job.yaml").read_text())
    assert ran["offload"]["w_gpu_percent"] + ran["offload"]["w_cpu_percent"] < 100  # some weights on disk
    assert "memory_gib" not in ran["hardware"] or ran["hardware"]["memory_gib"] is None
