"""Native CPU kernels: the C sources under runner/model/csrc/, compiled on first use into one library
with the system C compiler and loaded through ctypes.

No build step and no new package: a machine without a compiler (or with ALISA_NATIVE=0) runs
the pure-torch path, which computes the same math. The library is built for the host CPU
(-march=native), so its cache key names the CPU's flags, the compiler and the source: a home
directory shared by different machines never loads a library built for another CPU.

The cache holds code this process will run, so it is guarded like code: the directory is created 0700,
a library (or its record) not owned by this user or writable by group or others is refused, and each
build records the library's sha256 beside it (`<library>.sha256`), checked before every load. A cached
library that does not match its record (a crash mid-copy, a disk error) is rebuilt, and the status says so.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SOURCES = tuple(sorted((Path(__file__).with_name("csrc")).glob("*.c")))
HEADERS = tuple(sorted((Path(__file__).with_name("csrc")).glob("*.h")))  # in the cache key, not compiled alone
DISABLE_ENV = "ALISA_NATIVE"  # "0" turns the native kernels off
CACHE_ENV = "ALISA_NATIVE_CACHE"  # where built libraries go (default ~/.cache/alisa-runner/native)
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_BUILD_TIMEOUT_S = 120


RowsKey = tuple[str, str, str]  # (weight dtype, activation dtype, epilogue), e.g. ("int8", "bf16", "glu")


@dataclass(frozen=True, kw_only=True)
class NativeStatus:
    """Whether the native kernels are in use, and if not, why (one line)."""
    library: ctypes.CDLL | None
    reason: str
    rows: dict[RowsKey, ctypes._CFuncPtr] = field(default_factory=dict)  # `rows_entries` of the library

    @property
    def available(self) -> bool:
        return self.library is not None


def _compiler() -> list[str] | None:
    """The C compiler command ($CC, which may carry flags, else cc), or None if it is not on PATH."""
    cmd = shlex.split(os.environ.get("CC") or "cc")
    path = shutil.which(cmd[0]) if cmd else None
    return [path, *cmd[1:]] if path else None


@functools.lru_cache(maxsize=1)
def _cpu_flags_line() -> str | None:
    try:  # Linux: the feature flags -march=native compiles for
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags (Linux; empty elsewhere), e.g. "avx512_bf16"."""
    line = _cpu_flags_line()
    return frozenset(line.split(":", 1)[1].split()) if line else frozenset()


def _cpu_signature() -> str:
    return _cpu_flags_line() or platform.machine() + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alisa-runner" / "native"


def _build(cc: list[str], out: Path) -> str | None:
    """Compile SOURCES into `out` (atomically: concurrent processes may build at once).
    Returns None, or the compiler's first error line. OpenMP if the compiler has it."""
    error = "no attempt"
    for extra in (["-fopenmp"], []):
        try:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        except OSError as e:
            return f"cannot write in {out.parent}: {e.strerror}"
        os.close(fd)
        try:
            proc = subprocess.run([*cc, *_FLAGS, *extra, *map(str, SOURCES), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if proc.returncode == 0:
                os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
                _write_private(_record(out), hashlib.sha256(Path(tmp).read_bytes()).hexdigest() + "\n")
                os.replace(tmp, out)
                return None
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            error = lines[0] if lines else f"exit status {proc.returncode}"
        except (OSError, subprocess.TimeoutExpired) as e:
            error = str(e).splitlines()[0]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return error


def _declare(lib: ctypes.CDLL) -> None:
    ptr, long_, f32, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    # fp32 K/V (and norm rows), or bf16 ones: the same arguments
    for scores, values, norm in ((lib.decode_scores, lib.decode_values, lib.rms_norm),
                                 (lib.decode_scores_bf16, lib.decode_values_bf16, lib.rms_norm_bf16)):
        scores.argtypes = [ptr, ptr, ptr, *[long_] * 8, f32, int_]
        values.argtypes = [ptr, ptr, ptr, *[long_] * 8, int_, int_]
        norm.argtypes = [ptr, ptr, ptr, long_, long_, f32, int_]
        scores.restype = values.restype = norm.restype = None
    for fn in (lib.decode_attend, lib.decode_attend_bf16):  # q, k, v, scores, out, 9 sizes and strides, scale
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, *[long_] * 9, f32, int_]
        fn.restype = None
    lib.decode_softmax.argtypes = [ptr, long_, long_, int_]
    lib.decode_softmax.restype = None
    for fn in (lib.rope, lib.rope_bf16):  # x, cos, sin, out, b, h, s, d, x's strides (b, h, s), threads
        fn.argtypes = [ptr, ptr, ptr, ptr, *[long_] * 7, int_]
        fn.restype = None
    # linear_rows.c: x, weight, scale (int8) or null, out, residual (ADD) or null, rows, n, k, threads
    for fn in rows_entries(lib).values():
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, long_, long_, long_, int_]
        fn.restype = None


def rows_entries(lib: ctypes.CDLL) -> dict[RowsKey, ctypes._CFuncPtr]:
    """linear_rows.c's entry points by (weight "bf16", "int8" (a scale per row) or "q8" (a scale per 32
    weights, GGUF Q8_0's), activation dtype "bf16"/"fp32", epilogue "plain"/"add"/"glu")."""
    return {("bf16", "bf16", "plain"): lib.linear_rows_bf16, ("bf16", "bf16", "add"): lib.linear_rows_bf16_add,
            ("bf16", "bf16", "glu"): lib.linear_rows_bf16_glu,
            ("int8", "fp32", "plain"): lib.linear_rows_int8, ("int8", "fp32", "add"): lib.linear_rows_int8_add,
            ("int8", "fp32", "glu"): lib.linear_rows_int8_glu,
            ("int8", "bf16", "plain"): lib.linear_rows_int8_bf16,
            ("int8", "bf16", "add"): lib.linear_rows_int8_bf16_add,
            ("int8", "bf16", "glu"): lib.linear_rows_int8_bf16_glu,
            ("q8", "fp32", "plain"): lib.linear_rows_q8, ("q8", "fp32", "add"): lib.linear_rows_q8_add,
            ("q8", "fp32", "glu"): lib.linear_rows_q8_glu,
            ("q8", "bf16", "plain"): lib.linear_rows_q8_bf16, ("q8", "bf16", "add"): lib.linear_rows_q8_bf16_add,
            ("q8", "bf16", "glu"): lib.linear_rows_q8_bf16_glu}


@functools.cache
def status() -> NativeStatus:
    """Build (once per machine and source) and load the kernels, or say why not."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return NativeStatus(library=None, reason=f"turned off by {DISABLE_ENV}=0")
    cc = _compiler()
    if cc is None:
        return NativeStatus(library=None, reason=f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return NativeStatus(library=None, reason=f"{cc[0]} --version failed: {e}")
    sources = [f"{p.name}\0{p.read_text()}" for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*sources, version, " ".join(cc + _FLAGS), _cpu_signature()])
                         .encode()).hexdigest()[:16]
    return _load(cc, _cache_dir() / f"kernels-{key}.so")


def _load(cc: list[str], path: Path) -> NativeStatus:
    """Load the library at `path`, building it first when it is missing or does not match its record."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        return NativeStatus(library=None, reason=f"cannot create {path.parent}: {e.strerror}")
    unsafe = _unsafe(path.parent) or (_unsafe(path) or _unsafe(_record(path)) if path.exists() else None)
    if unsafe is not None:
        return NativeStatus(library=None, reason=f"refusing the native kernels: {unsafe}")
    rebuilt = ""
    if path.exists() and not _matches_record(path):
        rebuilt = f"; rebuilt {path.name}: the cached copy did not match its recorded sha256"
    if rebuilt or not path.exists():
        error = _build(cc, path)
        if error is not None:
            names = ", ".join(p.name for p in SOURCES)
            return NativeStatus(library=None, reason=f"{cc[0]} failed on {names}: {error}")
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as e:
        return NativeStatus(library=None, reason=f"cannot load {path}: {e}")
    return NativeStatus(library=lib, reason=f"built by {cc[0]} in {path.parent}{rebuilt}", rows=rows_entries(lib))


def _record(library: Path) -> Path:
    """Where the sha256 of what was built is kept: beside the library."""
    return library.with_name(library.name + ".sha256")


def _matches_record(library: Path) -> bool:
    try:
        return _record(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False  # no record (a cache from before records): rebuilt like a corrupt one


def _unsafe(path: Path) -> str | None:
    """Why `path` must not be trusted with code to load (another user owns it, or others may write it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _write_private(path: Path, text: str) -> None:
    """Write `path` atomically, readable by this user only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
