"""Run directories a killed process left in an offload dir (`DiskPool` removes its own on exit; a
process killed outright, by SIGKILL, OOM or power loss, runs no finalizer), found by name and removed
by the next pool opened on the same offload dir and host."""
from __future__ import annotations

import os
import re
import shutil
import socket

# DiskPool's run directories: run-<host>-<pid>-<random> (run-<pid>-<random> before hosts were named). The
# host, because a pid says whether a process lives on this machine only: Ray workers of several nodes may
# share one offload dir (a relative offload/ on the shared checkout), and must not reap each other's.
_RUN_DIR = re.compile(r"run-(?:(?P<host>.+)-)?(?P<pid>\d+)-[^-]+$")
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def remove_stale_runs(offload_dir: str) -> list[str]:
    """Delete the run directories in `offload_dir` that this user's processes on this host left when they
    were killed (SIGKILL, OOM, power loss: no finalizer ran). A directory is stale when its pid is no longer
    alive; another user's, another host's, and a live process's, are left alone. Returns the paths removed."""
    removed = []
    with os.scandir(offload_dir) as entries:
        for entry in entries:
            m = _RUN_DIR.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if m.group("host") in (None, _HOST) and not _pid_alive(int(m.group("pid"))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def run_dir_prefix() -> str:
    """The name of this process's run directories, before their random suffix: run-<host>-<pid>."""
    return f"run-{_HOST}-{os.getpid()}"
