"""`python tests/as_user.py UID GID UMASK -- ARGS...`: run `run.py ARGS...` (or, with `-c CODE`, CODE) as
the user UID:GID, from the repository root. Started as root; used by tests/test_permissions.py.

Why not `runuser -u USER -- python run.py`: the interpreter may live where only root can read it (a
pyenv under /root here), so this process starts as root, imports what the run needs from the
interpreter's standard library while it still can, then drops to the user for good (groups, gid, uid)
before the run does anything. Every file the run creates, stats or loads is then the user's business:
what the tests check. The repository, the venv and the model are read as the user too (imported after
the drop, or opened by the run).
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the run imports, imported before the drop: with them the standard-library modules they need,
# because the interpreter's own library directory may be unreadable to the user. A module the run
# imports lazily from the standard library and missing here fails the test with ModuleNotFoundError.
_PRELOAD = ("argparse", "timeit", "torch", "numpy", "pandas", "yaml",
            "matplotlib.backends.backend_agg", "matplotlib.figure",  # the run imports them to draw report.png
            "runner.run_job", "runner.engines.alisa", "runner.offload.executor",
            "runner.memory.tiers", "runner.model.native", "runner.data.reports", "runner.planner")


def _preload() -> None:
    import importlib
    for name in _PRELOAD:
        importlib.import_module(name)


def main(argv: list[str]) -> int:
    uid, gid, umask = int(argv[0]), int(argv[1]), int(argv[2], 8)
    rest = argv[argv.index("--") + 1:]
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    _preload()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # last: after it, no way back to root
    os.umask(umask)
    assert os.getuid() == uid and os.geteuid() == uid and os.getgid() == gid
    if rest[:1] == ["-c"]:
        exec(compile(rest[1], "<as_user -c>", "exec"), {"__name__": "__main__"})
        return 0
    sys.argv = ["run.py", *rest]
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
