"""runner/run_job.py: what a run refuses before its model loads or before its first batch, and how it
stops; real runs of run.py (subprocesses, signals, files), and its prompt check in process."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runner.data.dataset import Prompt
from runner.model.weights import load_model
from runner.run_job import MAX_BYTES_PER_TOKEN, prompt_tokenizer
from runner.run_loop import RunError
from test_run import ROOT, _run


def _small(out: Path, *extra: str) -> tuple[str, ...]:
    return ("jobs/smollm2-135m.yaml", "--set", "dataset.limit=2", "--set", "generation.max_new_tokens=2",
            "--set", "hardware.num_threads=1", "--set", f"output.dir={out}", *extra)


def _error_line(proc: subprocess.CompletedProcess, *, alone: bool = True) -> str:
    """The error; `alone`: the only line (an up-front error), else the last one, after the progress bar."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and (len(lines) == 1 or not alone), proc.stderr[-2000:]
    return lines[-1]


def test_a_run_that_failed_before_generating_does_not_block_the_corrected_job(tmp_path, smollm2_gguf_path):
    out = tmp_path / "out"
    assert "model.path" in _error_line(_run(*_small(out, "--set", "model.path=/nonexistent/model.gguf")))
    fixed = _run(*_small(out))  # the failed run's state named another model.path: it must not ask for --fresh
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2


def test_a_missing_dataset_is_found_before_the_model_loads(tmp_path):
    out, missing = tmp_path / "out", tmp_path / "missing.jsonl"
    # Both are wrong; the dataset is checked first, so its error comes out and no output dir is made.
    line = _error_line(_run(*_small(out, "--set", f"dataset.path={missing}", "--set", "model.path=/nonexistent")))
    assert line == f"error: dataset.path: {missing}: file not found"
    assert not out.exists()


def test_max_new_tokens_past_the_model_context_is_a_job_error(tmp_path, smollm2_gguf_path):
    line = _error_line(_run(*_small(tmp_path / "out", "--set", "generation.max_new_tokens=9000")))
    assert line.startswith("error: generation.max_new_tokens: 9000") and "8192-token context" in line
    assert not (tmp_path / "out" / "throughput.csv").exists()


@pytest.mark.parametrize("content, words", [
    ("", "has no records: nothing to run"),
    ('{"id": "a", "prompt": " "}\n{"id": "b"}\n', "all 2 records were rejected"),
])
def test_nothing_that_could_run_is_an_error_not_a_complete_run(tmp_path, smollm2_gguf_path, content, words):
    data = tmp_path / "p.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    args = _small(out, "--set", f"dataset.path={data}", "--set", "dataset.template=null")
    assert words in _error_line(_run(*args), alone=not content)  # all rejected: found as the records are read
    assert not (out / "throughput.csv").exists()
    again = _run(*args)  # and so again: no state makes it "already complete"
    assert words in _error_line(again, alone=not content)


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(tmp_path, smollm2_gguf_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "run.py", *_small(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 120
    while not (out / "state.json").exists():  # written just before the model loads (~2 s)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted while loading") and str(out) in lines[0], stderr
    again = _run(*_small(out))
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_huge_prompt_is_refused_by_its_bytes_before_tokenizing():
    loaded = load_model(name="opt-125m", path="dummy", dtype=torch.float32, with_weights=False)
    tokenize = prompt_tokenizer(loaded, max_new_tokens=8)
    huge = Prompt(id="big", text="word " * 2_000_000, line=1, index=0)  # 10 MB on one line
    start = time.monotonic()
    with pytest.raises(RunError, match=r"^prompt too long: 10,000,000 bytes, more than the model's 2048-token"):
        tokenize(huge)
    assert time.monotonic() - start < 0.5
    limit = 2048 * MAX_BYTES_PER_TOKEN
    at_bound = Prompt(id="b", text="é" * (limit // 2), line=1, index=0)  # exactly the bound in bytes: tokenized
    with pytest.raises(RunError, match="prompt tokens"):
        tokenize(at_bound)
    assert tokenize(Prompt(id="ok", text="Say hi.", line=1, index=0))


def test_a_q8_0_gguf_with_weight_bits_8_runs_from_its_stored_int8(tmp_path, tiny_llama_ggufs):
    """run.py end to end on a GGUF whose layer linears are Q8_0, read as stored (`model.weight_bits: 8`): the
    run's up-front memory check and the row's dtype label take int8 weights as they come."""
    gguf = tiny_llama_ggufs["gqa_tied_q8"]
    proc = _run(*_small(tmp_path / "out", "--set", f"model.path={gguf}", "--set", "model.weight_bits=8",
                        "--set", "model.dtype=float32"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "out" / "generations.jsonl").read_text().splitlines()) == 2
    row = (tmp_path / "out" / "throughput.csv").read_text().splitlines()
    assert "float32+int8w" in row[-1]
