"""A run as an unprivileged user (`nobody`), for real: a small offload job (weights partly on the disk
tier, native kernels built into the user's XDG_CACHE_HOME) run by tests/as_user.py, which starts as
root and drops to the user before the run starts. Checked: every file the run creates is the user's
and not world-writable, the offload dir and its run directory are 0700 (the latter watched while the
run holds it) and gone after, the native cache is 0700, and a cached library another user owns is
refused. Skipped where the tests do not run as root (only root can become another user) or the
system has no `nobody`; `nobody` rather than a new user from useradd, so the test leaves /etc/passwd
alone on a shared machine."""
from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
UMASK = 0o002  # a common login default (user-private groups): files 0664, dirs 0775 unless we chose


@dataclass
class UserRun:
    user: pwd.struct_passwd
    home: Path  # the user's own 0700 directory: outputs, offload dir, XDG cache
    env: dict[str, str]
    proc: subprocess.CompletedProcess | None = None
    run_dir_modes: dict[str, tuple[int, int]] = field(default_factory=dict)  # run-<pid>-* -> (mode, uid)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / "tests" / "as_user.py"), str(self.user.pw_uid), str(self.user.pw_gid),
                f"{UMASK:o}", "--", *args]


def _watch_run_dirs(proc: subprocess.Popen, offload: Path, seen: dict[str, tuple[int, int]]) -> None:
    """Poll the offload dir while the run lives, noting each run directory's mode and owner."""
    while proc.poll() is None:
        try:
            for entry in os.scandir(offload):
                if entry.name.startswith("run-"):
                    st = entry.stat(follow_symlinks=False)
                    seen.setdefault(entry.name, (stat.S_IMODE(st.st_mode), st.st_uid))
        except FileNotFoundError:
            pass  # not created yet
        time.sleep(0.002)


@pytest.fixture(scope="module")
def user_run(smollm2_gguf_path) -> UserRun:
    if os.geteuid() != 0:
        pytest.skip("running a job as another user needs root (the test switches uid); not root here")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` user on this system")
    base = Path(tempfile.mkdtemp(prefix="alisa-perm-"))  # under /tmp: pytest's tmp dirs are root's 0700
    base.chmod(0o755)
    home, mpl = base / "home", base / "mpl"
    home.mkdir(mode=0o700)
    os.chown(home, user.pw_uid, user.pw_gid)
    mpl.mkdir()  # matplotlib's cache, written while the launcher is still root (it imports the run first)
    env = {k: v for k, v in os.environ.items() if k not in ("ALISA_NATIVE_CACHE", "ALISA_NATIVE")}
    env.update(HOME=str(home), USER=user.pw_name, LOGNAME=user.pw_name, XDG_CACHE_HOME=str(home / "cache"),
               MPLCONFIGDIR=str(mpl))
    run = UserRun(user=user, home=home, env=env)
    sets = ["dataset.limit=4", "generation.max_new_tokens=4", "hardware.num_threads=1", f"output.dir={home / 'out'}",
            f"hardware.offload_dir={home / 'offload'}"]
    cmd = run.command("jobs/offload-smollm2.yaml", *(a for s in sets for a in ("--set", s)))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _watch_run_dirs(proc, home / "offload", run.run_dir_modes)
    out, err = proc.communicate(timeout=300)
    run.proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    yield run
    shutil.rmtree(base, ignore_errors=True)


def test_the_run_succeeds_as_the_user(user_run):
    assert user_run.proc.returncode == 0, user_run.proc.stderr[-3000:]
    assert len((user_run.home / "out" / "generations.jsonl").read_text().splitlines()) == 4


def test_outputs_are_the_users_and_not_world_writable(user_run):
    out = user_run.home / "out"
    names = sorted(p.name for p in out.iterdir())
    assert {"generations.jsonl", "state.json", "run.lock", "throughput.csv", "batches.csv", "report.png"} <= set(names)
    for path in [out, *out.iterdir()]:
        st = path.lstat()
        assert st.st_uid == user_run.user.pw_uid, path
        assert not st.st_mode & stat.S_IWOTH, f"{path} is world-writable: {stat.S_IMODE(st.st_mode):o}"
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), path  # no links


def test_offload_dir_and_its_run_directory_are_private_and_removed(user_run):
    offload = user_run.home / "offload"
    assert stat.S_IMODE(offload.stat().st_mode) == 0o700  # created by the run, whatever the umask
    assert user_run.run_dir_modes, "no run directory was seen while the run lived"
    for name, (mode, uid) in user_run.run_dir_modes.items():
        assert (mode, uid) == (0o700, user_run.user.pw_uid), f"{name}: mode {mode:o}, uid {uid}"
    assert not list(offload.iterdir())  # the disk tier's files went with the run


def test_native_cache_is_private_and_a_library_of_another_user_is_refused(user_run):
    cache = user_run.home / "cache" / "alisa-runner" / "native"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and cache.stat().st_uid == user_run.user.pw_uid
    libraries = list(cache.glob("kernels-*.so"))
    assert len(libraries) == 1, list(cache.iterdir())
    for path in (libraries[0], libraries[0].with_name(libraries[0].name + ".sha256")):
        assert path.stat().st_uid == user_run.user.pw_uid and not path.stat().st_mode & 0o077, path
    probe = "from runner.model import native; print(native.status().reason)"
    ours = subprocess.run(user_run.command("-c", probe), cwd=ROOT, env=user_run.env, capture_output=True,
                          text=True, timeout=120)
    assert ours.returncode == 0 and ours.stdout.startswith("built by"), ours.stderr[-2000:]
    os.chown(libraries[0], 0, 0)  # the same bytes, planted by another user (root)
    planted = subprocess.run(user_run.command("-c", probe), cwd=ROOT, env=user_run.env, capture_output=True,
                             text=True, timeout=120)
    assert planted.returncode == 0, planted.stderr[-2000:]
    assert planted.stdout.strip() == (f"refusing the native kernels: {libraries[0]} is owned by uid 0, not this "
                                      f"user ({user_run.user.pw_uid})")
