"""Resumable runs (runner/resume.py): the run state on its own, then real runs of run.py killed with
SIGKILL or stopped with SIGINT and resumed, against one uninterrupted run of the same job."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from runner.data.dataset import iter_records
from runner.job import job_from_dict
from runner.resume import GENERATIONS, STATE_FILE, ResumeError, open_state, reorder_windows

ROOT = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, **dataset) -> object:
    data = tmp_path / "p.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(20)))
    return job_from_dict({"name": "t", "model": {"name": "opt-125m", "path": "dummy"},
                          "dataset": {"path": str(data), **dataset}, "output": {"dir": str(tmp_path / "out")}})


def test_frontier_advances_over_finished_positions_and_other_shards_windows(tmp_path):
    job = _job(tmp_path, shard_index=1, shard_count=2)
    state = open_state(job, window=4)
    assert state.frontier == 4  # window 0 (positions 0-3) belongs to shard 0
    state.mark([5, 6])
    assert state.frontier == 4 and state.done == {5, 6} and not state.is_done(4) and state.is_done(6)
    state.mark([4, 7])
    assert state.frontier == 12 and state.done == set()  # window 2 (8-11) is shard 0's
    assert state.owns(13) and not state.owns(9)


def test_offset_starts_the_frontier(tmp_path):
    assert open_state(_job(tmp_path, offset=6), window=4).frontier == 6


def test_reopen_cuts_what_was_appended_after_the_last_commit(tmp_path):
    job = _job(tmp_path)
    state = open_state(job, window=2)
    gen = state.out_dir / GENERATIONS
    gen.write_text('{"index": 0}\n')
    state.prompts = 1
    state.mark([0])
    state.commit()
    with gen.open("a") as f:
        f.write('{"index": 1}\n{"ind')  # a batch in flight when the process was killed
    again = open_state(job, window=2)
    assert gen.read_text() == '{"index": 0}\n'
    assert again.frontier == 1 and again.prompts == 1


def test_a_changed_spec_is_refused_naming_the_key_and_fresh_starts_over(tmp_path):
    state = open_state(_job(tmp_path), window=2)
    state.prompts = 1  # something was generated (a state with nothing blocks nothing, see below)
    state.commit()
    changed = job_from_dict({**_job(tmp_path).to_dict(), "generation": {"max_new_tokens": 5}})
    with pytest.raises(ResumeError, match=r"^generation\.max_new_tokens: .*64, now 5.*--fresh"):
        open_state(changed, window=2)
    (tmp_path / "out" / GENERATIONS).write_text("x\n")
    fresh = open_state(changed, window=2, fresh=True)
    assert fresh.frontier == 0 and (tmp_path / "out" / GENERATIONS).read_text() == ""


def test_a_state_that_generated_nothing_blocks_no_changed_job(tmp_path):
    """A run that failed before its first batch (bad model path, Ctrl-C while loading) left a state naming
    its job; the corrected job starts over instead of being told to use --fresh."""
    state = open_state(_job(tmp_path), window=2)
    (tmp_path / "out" / "rejects.jsonl").write_text('{"index": 0}\n')
    state.rejects = 1
    state.mark([0])
    state.commit()
    changed = job_from_dict({**_job(tmp_path).to_dict(), "generation": {"max_new_tokens": 5}})
    again = open_state(changed, window=2)
    assert again.frontier == 0 and again.rejects == 0 and (tmp_path / "out" / "rejects.jsonl").read_text() == ""
    again.prompts = 1  # once something was generated, a changed job is refused as before
    again.commit()
    with pytest.raises(ResumeError, match="max_new_tokens"):
        open_state(_job(tmp_path), window=2)


def _finish_first(state, n: int) -> None:
    """What the loop does for a batch: the next `n` records' generations written, marked, committed."""
    job = _job(state.out_dir.parent)
    records = list(itertools.islice((r for r in iter_records(job.dataset) if not state.is_done(r.index)), n))
    with (state.out_dir / GENERATIONS).open("a") as f:
        f.writelines(json.dumps({"index": r.index}) + "\n" for r in records)
    state.prompts += n
    state.mark(r.index for r in records)
    state.read(records)
    state.commit()


def test_a_dataset_edited_above_what_was_finished_refuses_to_resume(tmp_path):
    data = tmp_path / "p.jsonl"
    _finish_first(open_state(_job(tmp_path), window=2), 4)
    original = data.read_bytes()
    data.write_bytes(original + b'{"id": "more", "prompt": "appended later"}\n')  # appending is fine
    state = open_state(_job(tmp_path), window=2)
    _finish_first(state, 2)  # the fingerprint goes on from where it was, over the newly read bytes only
    size, digest = state.dataset[str(data)]
    assert size == len(b"".join(original.splitlines(keepends=True)[:6]))
    assert digest == hashlib.sha256(original[:size]).hexdigest()
    data.write_bytes(b'{"id": "new", "prompt": "prepended"}\n' + data.read_bytes())
    with pytest.raises(ResumeError, match=rf"^dataset\.path: {data} changed since the run being resumed read it "
                       rf"\(its first {size:,} bytes differ\), so its 6 finished prompts.*--fresh"):
        open_state(_job(tmp_path), window=2)
    data.write_bytes(original[:size - 1])  # cut short
    with pytest.raises(ResumeError, match="changed since"):
        open_state(_job(tmp_path), window=2)
    assert len((tmp_path / "out" / GENERATIONS).read_text().splitlines()) == 6  # refused before touching it


def test_a_larger_limit_continues_a_complete_run(tmp_path):
    state = open_state(_job(tmp_path, limit=4), window=2)
    state.complete, state.limit = True, 4
    state.commit()
    assert open_state(_job(tmp_path, limit=4), window=2).complete
    assert not open_state(_job(tmp_path, limit=8), window=2).complete


def test_outputs_without_a_state_are_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / GENERATIONS).write_text('{"id": "x"}\n')
    with pytest.raises(ResumeError, match="no state.json.*--fresh"):
        open_state(_job(tmp_path), window=2)


def test_reorder_windows_sorts_inside_windows_only(tmp_path):
    path = tmp_path / "g.jsonl"
    order = [2, 0, 3, 1, 5, 4, 7]  # windows of 4: {0..3} then {4..7}
    path.write_text("".join(json.dumps({"index": i}) + "\n" for i in order))
    reorder_windows(path, window=4)
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5, 7]


# ---------------------------------------------------------------- real runs of run.py

def _cmd(out: Path, *extra: str) -> list[str]:
    # 16 shipped prompts in batches of 2: 8 batches of a few tenths of a second each.
    return [sys.executable, "run.py", "jobs/smollm2-135m.yaml", "--set", "batch.gpu_batch_size=2",
            "--set", "generation.max_new_tokens=8", "--set", "hardware.num_threads=1",
            "--set", f"output.dir={out}", *extra]


def _batches_committed(out: Path) -> int:
    try:
        return json.loads((out / STATE_FILE).read_text())["batches"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _start_and_wait(out: Path, batches: int) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test runner started in the background ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 300
    while _batches_committed(out) < batches:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_gguf_path) -> str:
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / GENERATIONS).read_text()


def test_sigkill_then_resume_gives_the_uninterrupted_file(tmp_path, reference):
    out = tmp_path / "killed"
    proc = _start_and_wait(out, batches=2)
    proc.kill()
    proc.communicate()
    done_before = len((out / GENERATIONS).read_text().splitlines())
    assert 4 <= done_before < 16
    again = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / GENERATIONS).read_text() == reference  # same ids, same completions, same order, no duplicate
    rows = pd.read_csv(out / "throughput.csv")
    assert list(rows.status) == ["complete"] and rows.resumed_prompts[0] >= 4
    assert rows.num_prompts[0] + rows.resumed_prompts[0] == 16
    batches = pd.read_csv(out / "batches.csv")
    assert batches.prompts.sum() == 16 and list(batches.batch) == list(range(8))
    done = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "already complete" in done.stdout
    assert len(pd.read_csv(out / "throughput.csv")) == 1  # nothing run, no row


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_stops_cleanly_with_a_row_and_resumes(tmp_path, reference, signum):
    out = tmp_path / "interrupted"
    proc = _start_and_wait(out, batches=1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "run the same command again to resume" in stderr
    rows = pd.read_csv(out / "throughput.csv")
    assert list(rows.status) == ["interrupted"] and 2 <= rows.num_prompts[0] < 16
    assert len((out / GENERATIONS).read_text().splitlines()) == rows.num_prompts[0]
    again = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / GENERATIONS).read_text() == reference
    rows = pd.read_csv(out / "throughput.csv")
    assert list(rows.status) == ["interrupted", "complete"] and rows.num_prompts.sum() == 16


def test_a_second_run_into_the_same_dir_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, reference):
    out = tmp_path / "locked"
    first = _start_and_wait(out, batches=1)
    first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, for as long as the test needs
    try:
        before = (out / GENERATIONS).read_text()
        start = time.monotonic()
        second = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: output.dir: {out} is in use by another run (pid {first.pid}); wait for it to finish or stop it, "
            "or choose another output.dir"]
        assert time.monotonic() - start < 30  # refused before the model loads
        assert (out / GENERATIONS).read_text() == before  # the holder's files were not cut back
    finally:
        first.kill()  # a stopped process dies of SIGKILL too; the kernel drops its lock
        first.communicate()
    again = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]  # the lock file of the dead run does not block
    assert (out / GENERATIONS).read_text() == reference


def test_changed_generation_params_refuse_to_resume(tmp_path, reference):
    out = tmp_path / "changed"
    proc = _start_and_wait(out, batches=1)
    proc.kill()
    proc.communicate()
    changed = subprocess.run(_cmd(out, "--set", "generation.max_new_tokens=9"), cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert changed.returncode == 2
    assert changed.stderr.count("\n") == 1 and "generation.max_new_tokens" in changed.stderr
    assert "--fresh" in changed.stderr


def test_a_write_error_mid_run_stops_cleanly_keeping_what_was_committed(tmp_path, reference):
    """A file-size limit makes writes fail part-way (EFBIG), as a full disk would (ENOSPC)."""
    out = tmp_path / "full"
    limit = len(reference.encode()) // 2

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "generations.jsonl" in last and "run the same command again" in last
    kept = (out / GENERATIONS).read_text()
    assert kept.endswith("\n") and reference.startswith(kept) and len(kept) < len(reference)  # committed lines only
    again = subprocess.run(_cmd(out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / GENERATIONS).read_text() == reference


def test_ctrl_c_on_a_sweep_stops_at_the_running_point_and_the_same_command_resumes(tmp_path, reference):
    out = tmp_path / "sweep"
    cmd = _cmd(out, "--set", "sweep={generation.seed: [0, 1]}")
    # A terminal's Ctrl-C signals the whole foreground process group: the sweep and its running point.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    first = out / "points" / "seed-0"
    deadline = time.monotonic() + 300
    while _batches_committed(first) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "sweep interrupted at point generation.seed=0" in stderr
    assert not (out / "points" / "seed-1").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for point in ("seed-0", "seed-1"):
        assert (out / "points" / point / GENERATIONS).read_text() == reference  # greedy: the seed changes nothing
    rows = pd.read_csv(out / "throughput.csv")
    assert list(rows.status) == ["interrupted", "complete", "complete"]
