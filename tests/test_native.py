"""runner/model/native.py: the cache of built kernels is guarded like code. Real builds with the system
compiler into a private cache directory (ALISA_NATIVE_CACHE), each test starting from a fresh status()."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from runner.model import native

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache" / "native"


def _fresh(cache: Path) -> tuple[bool, str]:
    """(available, reason) as a new process finds them: a library loaded in this one would stay mapped
    (dlopen returns the loaded copy by name), and overwriting its file in place would crash the process."""
    code = "import json; from runner.model import native; s = native.status(); print(json.dumps([s.available, s.reason]))"
    env = {**os.environ, native.CACHE_ENV: str(cache)}
    env.pop(native.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    available, reason = json.loads(proc.stdout)
    return available, reason


def _library(cache: Path) -> Path:
    (lib,) = cache.glob("kernels-*.so")
    return lib


def test_the_cache_is_private_and_records_what_it_built(cache):
    available, reason = _fresh(cache)
    assert available and "rebuilt" not in reason, reason
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    lib = _library(cache)
    built = lib.read_bytes()
    assert Path(f"{lib}.sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert not stat.S_IMODE(lib.stat().st_mode) & 0o077
    available, reason = _fresh(cache)  # a matching library is loaded, not rebuilt
    assert available and "rebuilt" not in reason and lib.read_bytes() == built


def test_a_corrupt_cached_library_is_rebuilt_and_says_so(cache):
    assert _fresh(cache)[0]
    lib = _library(cache)
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 2])  # a half-written copy: loading it would crash or fail
    available, reason = _fresh(cache)
    assert available, reason  # rebuilt, not a silent fall back to torch
    assert f"rebuilt {lib.name}" in reason
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == Path(f"{lib}.sha256").read_text().strip()


def test_a_library_or_directory_others_can_write_or_not_ours_is_refused(cache):
    assert _fresh(cache)[0]
    lib = _library(cache)
    lib.chmod(0o722)
    available, reason = _fresh(cache)
    assert not available and f"{lib} is writable by group or others (mode 722)" in reason
    lib.chmod(0o700)
    cache.chmod(0o777)
    available, reason = _fresh(cache)
    assert not available and f"{cache} is writable by group or others" in reason
    cache.chmod(0o700)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(lib, 12345, -1)
        available, reason = _fresh(cache)
        assert not available and "owned by uid 12345, not this user (0)" in reason
        os.chown(lib, 0, -1)
    assert _fresh(cache)[0]
