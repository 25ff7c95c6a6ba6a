"""Calibration (`runner.plan.calibrate`, `python run.py calibrate`): a quick run on this CPU measures plausible
figures through the runner's own code paths and writes a profile that `load_profile` reads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.plan.calibrate import QUICK, calibrate
from runner.plan.measure import MIB
from runner.plan.hardware import dump_profile, load_profile

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    offload = tmp_path_factory.mktemp("offload")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile, rows = calibrate(device=torch.device("cpu"), offload_dir=str(offload), quick=True, name="quick")
    finally:
        torch.set_num_threads(before)
    return profile, rows, offload


def test_quick_calibration_gives_plausible_figures(quick):
    profile, _, _ = quick
    t, bw, mem, ov = profile.tflops, profile.bandwidth_gbps, profile.memory_gib, profile.overhead_us
    for name in ("gpu_matmul", "gpu_attention", "gpu_recompute"):
        assert 1e-5 < getattr(t, name) < 100, name
    assert 1e-4 < t.gpu_matmul < 100
    for name in ("gpu_from_cpu", "cpu_from_gpu", "cpu_from_disk", "disk_from_cpu", "gpu_memory"):
        assert 1e-3 < getattr(bw, name) < 1e4, name
    # One processor is both sides on a CPU device, and both tiers are the same RAM.
    assert (t.cpu_matmul, t.cpu_attention, bw.cpu_memory) == (t.gpu_matmul, t.gpu_attention, bw.gpu_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30  # profiles state memory in GiB
    assert mem.gpu == mem.cpu == pytest.approx(ram, rel=0.01)
    assert mem.disk > 0 and not profile.accelerator
    assert 0.1 < ov.transfer < 1e5 and 1 < ov.layer < 1e5 and ov.step >= 0 and ov.select >= 0


def test_every_profile_figure_comes_from_one_measurement_row(quick):
    profile, rows, _ = quick
    fields = [r["field"] for r in rows if r["field"]]
    assert len(fields) == len(set(fields))
    for field in fields:
        section, name = field.split(".")
        assert getattr(getattr(profile, section), name) == next(r["value"] for r in rows if r["field"] == field)
    assert all(set(r) == {"name", "field", "shape", "seconds", "value", "unit"} for r in rows)


def test_link_and_disk_figures_are_bytes_over_median_seconds(quick):
    _, rows, _ = quick
    by_field = {r["field"]: r for r in rows}
    for field, mib in (("bandwidth_gbps.gpu_from_cpu", QUICK.copy_mib),
                       ("bandwidth_gbps.cpu_from_disk", QUICK.disk_mib),
                       ("bandwidth_gbps.disk_from_cpu", QUICK.disk_mib)):
        r = by_field[field]
        assert r["value"] == pytest.approx(mib * MIB / r["seconds"] / 1e9, rel=1e-3)
    matmul = by_field["tflops.gpu_matmul"]
    assert matmul["value"] == pytest.approx(2 * QUICK.matmul_n ** 3 / matmul["seconds"] / 1e12, rel=1e-3)


def test_disk_files_are_removed(quick):
    assert list(quick[2].iterdir()) == []


def test_profile_round_trips_through_yaml(quick, tmp_path):
    path = tmp_path / "quick.yaml"
    path.write_text(dump_profile(quick[0]))
    assert load_profile(str(path)) == quick[0]


def test_missing_offload_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError) as err:
        calibrate(device=torch.device("cpu"), offload_dir=str(tmp_path / "absent"), quick=True)
    assert "\n" not in str(err.value) and "absent" in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", "calibrate", "--quick", "--threads", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_writes_a_profile_load_profile_reads(tmp_path):
    out = tmp_path / "sub" / "this-machine.yaml"
    proc = _cli("--out", str(out), "--offload-dir", str(tmp_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile = load_profile(str(out))
    assert profile.name == "this-machine"
    text = out.read_text()
    assert text.startswith("# Measured by `python run.py calibrate --quick --threads 1 --out ")
    assert "torch threads 1" in text and f"torch {torch.__version__}" in text
    lines = proc.stdout.splitlines()
    assert any(line.startswith("tflops.gpu_matmul") and "TFLOP/s" in line for line in lines)
    assert lines[-1].startswith("calibration done in") and str(out) in lines[-1]


@pytest.mark.parametrize("args, needle", [
    (["--offload-dir", "{tmp}/absent"], "--offload-dir"),
    (["--out", "{tmp}", "--offload-dir", "{tmp}"], "is a directory"),
    (["--threads", "0", "--out", "{tmp}/x.yaml", "--offload-dir", "{tmp}"], "--threads"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, args, needle):
    proc = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], proc.stderr
    assert not (tmp_path / "x.yaml").exists()
