"""The disk pool's files: removed on exit, on an exception, on Ctrl-C in a real subprocess, after a
`kill -9` by the next pool on the same host (another host's left alone), and a plan bigger than the
free disk refused before anything is written. (Budgets and copies between tiers: test_memory.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runner.memory import stale
from runner.memory.tiers import DiskPool, Memory, TierBudgets

REPO = Path(__file__).resolve().parents[1]

def test_disk_files_removed_on_context_exit(tmp_path: Path):
    with DiskPool(str(tmp_path)) as disk:
        disk.write(disk.alloc((4,), torch.float32, "x"), torch.ones(4))
        root = disk.root
        assert os.listdir(root)
    assert not os.path.exists(root) and disk.closed
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="after close"):
        disk.alloc((1,), torch.int8, "late")


def test_disk_files_removed_on_exception(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"):
        with Memory(TierBudgets(offload_dir=str(tmp_path)), device="cpu") as mem:
            mem.disk.alloc((4,), torch.float32, "x")
            root = mem.disk.root
            raise RuntimeError("boom")
    assert not os.path.exists(root)


def test_two_pools_share_an_offload_dir_without_clashing(tmp_path: Path):
    with DiskPool(str(tmp_path)) as a, DiskPool(str(tmp_path)) as b:
        assert a.root != b.root
        a.alloc((1,), torch.int8, "x")
        b.close()
        assert os.listdir(a.root)  # closing one run leaves the other's files alone


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from runner.memory.tiers import DiskPool

    # A parent started in the background (nohup, `&` in a script) hands down SIGINT ignored: restore
    # Python's handler so the signal this test sends arrives as KeyboardInterrupt wherever it runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def fill(pool):
        pool.write(pool.alloc((256,), torch.float32, "kv"), torch.ones(256))
        print(pool.root, len(os.listdir(pool.root)), flush=True)

    mode, offload = sys.argv[1], sys.argv[2]
    if mode == "with":
        try:
            with DiskPool(offload) as pool:
                fill(pool)
                os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt unwinds through the with block
                time.sleep(60)
        except KeyboardInterrupt:
            print("exists after with:", os.path.exists(pool.root), flush=True)  # before any atexit
            raise
    else:
        pool = DiskPool(offload)  # no with block: the atexit fallback has to clean up
        fill(pool)
        time.sleep(60)  # the parent sends SIGINT meanwhile
""")


@pytest.mark.parametrize("mode", ["with", "atexit"])
def test_disk_files_removed_on_sigint(tmp_path: Path, mode: str):
    offload = tmp_path / "offload"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(offload)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        root, nfiles = child.stdout.readline().split()
        if mode == "atexit":
            child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
        # Not communicate(): readline() may already have buffered the child's next line, and communicate
        # reads the pipe past that buffer. The outputs are a few lines, far below a pipe's capacity.
        out, err = child.stdout.read(), child.stderr.read()
    finally:
        child.kill()
    if mode == "with":  # the with block cleaned up, not the atexit fallback
        assert out.strip() == "exists after with: False", err[-2000:]
    assert "KeyboardInterrupt" in err
    assert child.returncode != 0
    assert Path(root).parent == offload and int(nfiles) == 1  # the file existed before the signal
    assert not os.path.exists(root)
    assert os.listdir(offload) == []


_KILLED_RUN = """
import os, sys, time, torch
from runner.memory.pools import DiskPool
pool = DiskPool(sys.argv[1])
pool.write(pool.alloc((256, 1024), torch.float32, "w"), torch.ones(256, 1024))
print(pool.root, flush=True)
time.sleep(600)
"""


def test_a_run_killed_with_sigkill_leaves_files_that_the_next_pool_removes(tmp_path):
    """kill -9 runs no finalizer, so its run directory stays; the next DiskPool on the same offload dir
    removes it (its pid is dead), and leaves a live process's directory alone."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                            text=True)
    left = Path(proc.stdout.readline().strip())
    live = DiskPool(str(tmp_path))  # this process's directory: alive, never removed by another pool
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and any(left.iterdir())  # the killed run's 1 MiB file is still there
    nxt = DiskPool(str(tmp_path))
    assert nxt.removed_stale == [str(left)] and not left.exists()
    assert Path(live.root).is_dir() and Path(nxt.root).is_dir()
    assert oct(Path(nxt.root).stat().st_mode & 0o777) == "0o700"
    live.close()
    nxt.close()


def test_stale_runs_of_another_host_are_left_alone(tmp_path):
    """A pid is alive or dead on its own host only: Ray workers of two nodes sharing an offload dir must not
    remove each other's live run directories. Named for this host (or without one: older runs), removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited: no process of this pid on this host now (barring reuse within the test)
    other = tmp_path / f"run-other-node-7-{pid}-abc_1234"
    mine, legacy = tmp_path / f"run-{stale._HOST}-{pid}-x1y2z3_4", tmp_path / f"run-{pid}-q9w8e7r6"
    for d in (other, mine, legacy):
        d.mkdir()
        (d / "000000.bin").write_bytes(b"x")
    assert sorted(stale.remove_stale_runs(str(tmp_path))) == sorted([str(mine), str(legacy)])
    assert other.is_dir() and not mine.exists() and not legacy.exists()
    pool = DiskPool(str(tmp_path))
    assert Path(pool.root).name.startswith(f"run-{stale._HOST}-{os.getpid()}-") and other.is_dir()
    pool.close()


def test_a_plan_bigger_than_the_free_disk_is_refused_before_writing(tmp_path):
    import shutil
    from runner.memory.pools import DiskSpaceError
    pool = DiskPool(str(tmp_path))
    free = shutil.disk_usage(tmp_path).free
    pool.check_space(1 << 20, "plan (disk weights 1 MiB)")
    with pytest.raises(DiskSpaceError, match=r"plan \(disk weights\) needs .* on disk but the filesystem of .* free"):
        pool.check_space(free + (1 << 40), "plan (disk weights)")
    assert not any(Path(pool.root).iterdir())
    pool.close()


_HEAP_CHILD = """
import torch
from runner.memory.pools import return_freed_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024

torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # freed: glibc's mmap threshold rises past 4 MiB
chunks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(50)]  # 200 MiB in the heap
pin = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)  # above them: free() cannot trim the heap's top
del chunks
before = rss()
return_freed_memory()
print(before, rss())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's heap")
def test_return_freed_memory_gives_the_heap_back():
    # Why run_job calls it before drawing report.png: freed KV pages stay resident in the heap until trimmed.
    out = subprocess.run([sys.executable, "-c", _HEAP_CHILD], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=True).stdout
    before, after = map(int, out.split())
    assert before - after > 150 << 20, (before, after)
