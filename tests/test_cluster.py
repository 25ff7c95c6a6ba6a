"""Scale-out on Ray, for real: a local Ray cluster (`ray.init(num_cpus=2)`), the embedded SmolLM2, two
workers of one thread each against one process of one thread. Same outputs, in the same order; a worker
killed mid-run has its shard re-run by Ray, resuming, without duplicates. Plus the cluster section's
checks and the merge on hand-written shard files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from runner.cluster import merge_batches, merge_jsonl, run_on_ray
from runner.job import JobError, OutputOrder, job_from_dict, load_job

ROOT = Path(__file__).resolve().parents[1]
# 12 prompts in windows of 2 (one batch each): 3 windows per shard, so a worker can be killed between two.
SETS = ("dataset.limit=12", "generation.max_new_tokens=10", "batch.gpu_batch_size=2", "hardware.num_threads=1")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "jobs/smollm2-135m.yaml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _sets(out: Path) -> list[str]:
    return [a for s in (*SETS, f"output.dir={out}") for a in ("--set", s)]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, smollm2_gguf_path) -> Path:
    """The single-process run, one torch thread (as each Ray worker)."""
    out = tmp_path_factory.mktemp("reference")
    proc = _run(*_sets(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["index"] for r in _records(out)] == list(range(12))
    return out


@pytest.fixture(scope="module")
def reference(reference_dir) -> list[dict]:
    return _records(reference_dir)


def _same_bytes(out: Path, reference_dir: Path) -> bool:
    """generations.jsonl byte for byte as the uninterrupted single-process run's."""
    return (out / "generations.jsonl").read_bytes() == (reference_dir / "generations.jsonl").read_bytes()


def test_sharded_run_on_ray_equals_one_process(ray_cluster, reference, tmp_path):
    # The command line, joining the test's cluster by its address; the job itself says nothing of Ray.
    proc = _run(*_sets(tmp_path), "--ray", ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(tmp_path) == reference  # same ids, order, completions, token ids, finish reasons
    for i in (0, 1):  # each shard ran its own windows: w % 2 == i
        assert {r["index"] // 2 % 2 for r in _records(tmp_path / "shards" / str(i))} == {i}
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[0]
    assert (row.workers, row.num_prompts, row.status, row.num_threads) == (2, 12, "complete", 1)
    assert row.gen_len == pytest.approx(sum(len(r["completion_token_ids"]) for r in reference) / 12, abs=0.01)
    assert row.total_throughput > 0 and row.notes.startswith("ray: 2 workers x 1 threads")
    batches = pd.read_csv(tmp_path / "batches.csv")
    assert sorted(batches.shard) == [0, 0, 0, 1, 1, 1] and batches.prompts.sum() == 12
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "rejects.jsonl").read_text() == ""
    # Run again: every shard is complete, nothing runs, no row is added, the outputs stay.
    again = _run(*_sets(tmp_path), "--ray", ray_cluster)
    assert again.returncode == 0 and "already complete (12 prompts" in again.stdout, again.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "throughput.csv")) == 1 and _records(tmp_path) == reference
    # The same job in one process: refused in one line naming the Ray run (the state lies in the shards).
    local = _run(*_sets(tmp_path))
    assert local.returncode == 2 and local.stderr.strip().splitlines() == [
        f"error: output.dir: {tmp_path} holds the outputs of a Ray run (merged from shards/); run it again with "
        "--ray to resume it, or with --fresh to start over in one process"], local.stderr[-3000:]


def _committed(shard_dir: Path) -> int:
    try:
        return json.loads((shard_dir / "state.json").read_text())["prompts"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_committed(shard_dir: Path, prompts: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _committed(shard_dir) < prompts:
        assert time.monotonic() < deadline, f"{shard_dir} never committed {prompts} prompts"
        time.sleep(0.005)


def test_ctrl_c_stops_the_shards_and_the_same_command_resumes(ray_cluster, reference, tmp_path):
    cmd = [sys.executable, "run.py", "jobs/smollm2-135m.yaml", *_sets(tmp_path), "--ray", ray_cluster]
    # SIG_DFL in the child: a parent started in the background hands SIGINT down ignored.
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_committed(tmp_path / "shards" / "0", 2)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "run the same command again to resume" in err, err[-3000:]
    assert "status=interrupted" in out
    first = _records(tmp_path)  # what the shards had committed, merged
    assert 2 <= len(first) < 12 and first == [r for r in reference if r["index"] in {x["index"] for x in first}]
    proc = _run(*_sets(tmp_path), "--ray", ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(tmp_path) == reference
    rows = pd.read_csv(tmp_path / "throughput.csv")
    assert list(rows.status) == ["interrupted", "complete"]
    assert rows.resumed_prompts[1] == rows.num_prompts[0] and rows.num_prompts.sum() == 12


def _kill_when_committed(shard_dir: Path, prompts: int, timeout: float = 120) -> int:
    """SIGKILL the Ray worker running shard 0 once its state.json has `prompts` committed; returns the pid."""
    _wait_committed(shard_dir, prompts, timeout)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::shard-0"):  # Ray titles a worker by the task it runs
            pid = int(cmdline.parent.name)
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError("no Ray worker runs shard 0")


def test_killed_worker_has_its_shard_rerun_without_duplicates(ray_cluster, reference_dir, tmp_path):
    job = load_job(ROOT / "jobs/smollm2-135m.yaml", [*SETS, f"output.dir={tmp_path}", "cluster=ray"])
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(row=run_on_ray(job)))
    driver.start()
    shard0 = tmp_path / "shards" / "0"
    first = _kill_when_committed(shard0, prompts=2)
    # Ray's retry resumes the shard; kill that retry too, mid-shard, once it has committed a window more.
    second = _kill_when_committed(shard0, prompts=4)
    assert first != second and _committed(shard0) < 6  # killed mid-shard: it had a window left to generate
    driver.join(timeout=240)
    assert "row" in result
    records = _records(tmp_path)
    assert len({r["id"] for r in records}) == len(records) == 12 and _same_bytes(tmp_path, reference_dir)
    tries = pd.read_csv(shard0 / "throughput.csv")
    assert len(tries) == 1 and tries.resumed_prompts[0] >= 4  # the killed tries wrote no row; the last resumed
    row = result["row"]  # every prompt ran in this Ray run: the killed tries' committed batches count
    assert (row["num_prompts"], row["resumed_prompts"], row["status"], row["workers"]) == (12, 0, "complete", 2)


@pytest.mark.slow  # ~26 s alone, more on a shared machine: two drivers in turn
def test_worker_killed_past_max_retries_fails_in_one_line_and_the_same_command_resumes(ray_cluster, reference_dir,
                                                                                     tmp_path):
    cmd = [sys.executable, "run.py", "jobs/smollm2-135m.yaml", *_sets(tmp_path), "--ray", ray_cluster]
    driver = subprocess.Popen([*cmd, "--set", "cluster.max_retries=0"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _kill_when_committed(tmp_path / "shards" / "0", prompts=2)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    # No retry left: the run fails, shard 1 is cancelled (its worker force-killed), nothing is merged.
    lines = err.strip().splitlines()
    assert driver.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: shard 0 ({tmp_path / 'shards' / '0'}): ") and \
        lines[0].endswith("what it finished is kept there: the same command resumes"), lines
    assert not (tmp_path / "generations.jsonl").exists() and not (tmp_path / "throughput.csv").exists()
    again = _run(*_sets(tmp_path), "--ray", ray_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same_bytes(tmp_path, reference_dir)
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[0]
    assert (row.status, row.resumed_prompts + row.num_prompts) == ("complete", 12) and row.resumed_prompts >= 2


def _lock_holder(out: Path) -> int | None:
    try:
        return int((out / "run.lock").read_text())
    except (OSError, ValueError):
        return None


def _wait_locked_by(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _lock_holder(out) != proc.pid:  # the driver locks before Ray starts its shards
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_second_driver_is_refused_and_a_killed_driver_resumes(ray_cluster, reference_dir, tmp_path):
    cmd = [sys.executable, "run.py", "jobs/smollm2-135m.yaml", *_sets(tmp_path), "--ray", ray_cluster]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_locked_by(tmp_path, first)
        # A second driver while the first one's shards load: refused at once, one line naming the lock's dir
        # and holder, before it reaches Ray (else its shards would queue behind ours and merge over our files).
        second = _run(*_sets(tmp_path), "--ray", ray_cluster, "--fresh")
        assert second.returncode == 2 and second.stderr.strip().splitlines() == [
            f"error: output.dir: {tmp_path} is in use by another run (pid {first.pid}); wait for it to finish or "
            "stop it, or choose another output.dir"], second.stderr[-3000:]
        assert not (tmp_path / "throughput.csv").exists()
        _wait_committed(tmp_path / "shards" / "0", 2)
        first.kill()  # the driver dies mid-run; Ray ends the dead driver's tasks
        first.communicate(timeout=60)
    finally:
        first.kill()
    shard_states = [json.loads((tmp_path / "shards" / str(i) / "state.json").read_text()) for i in (0, 1)]
    assert not all(s["complete"] for s in shard_states)  # the kill landed mid-run
    assert not (tmp_path / "generations.jsonl").exists()  # nothing was merged
    again = _run(*_sets(tmp_path), "--ray", ray_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    records = _records(tmp_path)
    assert len({r["id"] for r in records}) == len(records) == 12 and _same_bytes(tmp_path, reference_dir)
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[-1]  # the killed driver wrote no row
    assert (row.status, row.resumed_prompts + row.num_prompts) == ("complete", 12) and row.resumed_prompts >= 2


@pytest.mark.slow
def test_second_driver_is_refused_and_the_first_completes_unharmed(ray_cluster, reference_dir, tmp_path):
    cmd = [sys.executable, "run.py", "jobs/smollm2-135m.yaml", *_sets(tmp_path)]
    first = subprocess.Popen([*cmd, "--ray", ray_cluster], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_locked_by(tmp_path, first)
        # Another Ray driver (its --fresh would delete the shards under our workers) and a single-process run
        # (it would write into the dir we merge into), both at once: refused by the lock in one line each.
        others = [subprocess.Popen([*cmd, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for extra in (("--ray", ray_cluster, "--fresh"), ())]
        refusal = [f"error: output.dir: {tmp_path} is in use by another run (pid {first.pid}); wait for it to "
                   "finish or stop it, or choose another output.dir"]
        for other in others:
            _, err = other.communicate(timeout=120)
            assert (other.returncode, err.strip().splitlines()) == (2, refusal), err[-3000:]
        assert first.poll() is None  # the refusals came while the first driver ran
        _, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert _same_bytes(tmp_path, reference_dir)
    rows = pd.read_csv(tmp_path / "throughput.csv")  # the first driver's row only, for every prompt
    assert (len(rows), rows.num_prompts[0], rows.resumed_prompts[0], rows.status[0]) == (1, 12, 0, "complete")
    assert all(json.loads((tmp_path / "shards" / str(i) / "state.json").read_text())["complete"] for i in (0, 1))


# ---------------------------------------------------------------- the cluster section

def _job(**cluster) -> dict:
    return {"name": "t", "model": {"name": "opt-125m"}, "dataset": {"path": "p.jsonl"}, **cluster}


def test_cluster_section_shorthand_and_defaults():
    assert not job_from_dict(_job()).cluster.on_ray
    job = job_from_dict(_job(cluster="ray"))
    assert job.cluster.on_ray and job.cluster.address is None and job.cluster.threads_per_worker == 1
    assert job_from_dict(job.to_dict()) == job
    full = job_from_dict(_job(cluster={"backend": "ray", "address": "auto", "workers": 4, "threads_per_worker": 2}))
    assert (full.cluster.workers, full.cluster.address) == (4, "auto")


@pytest.mark.parametrize("cluster, key", [
    ({"backend": "slurm"}, "cluster.backend"),
    ({"backend": "ray", "workers": 0}, "cluster.workers"),
    ({"backend": "ray", "threads_per_worker": 0}, "cluster.threads_per_worker"),
    ({"backend": "ray", "max_retries": -1}, "cluster.max_retries"),
    ({"backend": "local", "address": "auto"}, "cluster.address"),
    ({"workers": 2}, "cluster.workers"),
    ({"backend": "ray", "nodes": 2}, "cluster.nodes"),
    ("yes", "cluster"),
])
def test_bad_cluster_section_names_the_key(cluster, key):
    with pytest.raises(JobError) as e:
        job_from_dict(_job(cluster=cluster))
    assert e.value.key == key and str(e.value).startswith(key + ":")


def test_eval_job_cannot_run_on_ray():
    d = {"name": "t", "model": {"name": "opt-125m"}, "eval": {"task": "perplexity", "data": ["x.txt"]},
         "cluster": "ray"}
    with pytest.raises(JobError, match="^cluster: an eval job runs in one process"):
        job_from_dict(d)


def test_cli_ray_flag_becomes_the_cluster_section(tmp_path):
    proc = _run("--set", f"output.dir={tmp_path}", "--set", "cluster.threads_per_worker=0", "--ray")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ")
    assert "cluster.threads_per_worker" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- merging real files

def _write(path: Path, indices: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"r{i}", "index": i}) + "\n" for i in indices))


def test_merge_puts_windows_back_in_dataset_order(tmp_path):
    # Windows of 3 over 14 records: shard 0 has windows 0, 2, 4 (records length-sorted inside), shard 1 has
    # 1 and 3; index 7 was rejected (not in the file).
    _write(tmp_path / "0.jsonl", [2, 0, 1, 7 - 1, 8, 12, 13])
    _write(tmp_path / "1.jsonl", [5, 3, 4, 11, 10, 9])
    sources = [tmp_path / "0.jsonl", tmp_path / "1.jsonl", tmp_path / "missing.jsonl"]
    assert merge_jsonl(sources, tmp_path / "dataset.jsonl", 3, OutputOrder.DATASET) == 13
    assert [json.loads(x)["index"] for x in (tmp_path / "dataset.jsonl").read_text().splitlines()] == \
        [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    merge_jsonl(sources, tmp_path / "completion.jsonl", 3, OutputOrder.COMPLETION)
    assert [json.loads(x)["index"] for x in (tmp_path / "completion.jsonl").read_text().splitlines()] == \
        [2, 0, 1, 5, 3, 4, 6, 8, 11, 10, 9, 12, 13]
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_batches_adds_the_shard_column(tmp_path):
    for shard, elapsed in ((0, (1.0, 3.0)), (1, (2.0,))):
        lines = ["batch,prompts,elapsed_s"] + [f"{b},2,{e}" for b, e in enumerate(elapsed)]
        (tmp_path / f"{shard}.csv").write_text("\n".join(lines) + "\n")
    rows = merge_batches([tmp_path / "0.csv", tmp_path / "1.csv"], tmp_path / "batches.csv")
    merged = pd.read_csv(tmp_path / "batches.csv")
    assert len(rows) == 3 and list(merged.shard) == [0, 1, 0] and list(merged.elapsed_s) == [1.0, 2.0, 3.0]
    assert list(merged.batch) == [0, 0, 1] and merged.columns[-1] == "shard"


def test_ray_run_refuses_a_single_process_runs_dir(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    job = load_job(ROOT / "jobs/smollm2-135m.yaml", [f"output.dir={tmp_path}", "cluster=ray"])
    with pytest.raises(ValueError, match="holds a single-process run of this job"):
        run_on_ray(job)  # before Ray starts
    with pytest.raises(ValueError, match="dataset.shard_count: set by the Ray driver"):
        run_on_ray(load_job(ROOT / "jobs/smollm2-135m.yaml", ["dataset.shard_count=2", "cluster=ray"]))
