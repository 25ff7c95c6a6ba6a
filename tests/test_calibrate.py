"""Calibration (`runner.plan.calibrate` + `runner.plan.measure`, `python run.py calibrate`): a quick run on this
CPU measures plausible figures through the runner's own code paths and writes a profile that `load_profile`
reads; a figure out of its plausible range, repeats that spread too far, or a passed deadline refuse it."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runner.plan.calibrate import PLAUSIBLE, QUICK, calibrate, check_figures, implausible
from runner.plan.measure import MAX_SPREAD, MIB, CalibrationError, Deadline, Timer
from runner.plan.hardware import dump_profile, load_profile, shipped_profiles

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRIES = 3  # other test runs share this machine: a calibration refused as unstable is tried again, up to this


def _quick_calibration(offload: Path):
    for attempt in range(TRIES):
        try:
            return calibrate(device=torch.device("cpu"), offload_dir=str(offload), quick=True, name="quick")
        except CalibrationError as e:
            if "unstable" not in str(e) or attempt == TRIES - 1:
                raise


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    offload = tmp_path_factory.mktemp("offload")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile, rows = _quick_calibration(offload)
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


def test_the_profile_records_whether_the_cpu_has_native_bf16(quick):
    """`dtype: auto` plans bf16 on such a CPU (runner.planner.plan_dtype)."""
    from runner.model import kernels
    assert quick[0].native_bf16 == kernels.native_bf16() and not quick[0].accelerator


def test_every_profile_figure_comes_from_one_measurement_row(quick):
    profile, rows, _ = quick
    fields = [r["field"] for r in rows if r["field"]]
    assert len(fields) == len(set(fields))
    for field in fields:
        section, name = field.split(".")
        assert getattr(getattr(profile, section), name) == next(r["value"] for r in rows if r["field"] == field)
    assert all(set(r) == {"name", "field", "shape", "seconds", "value", "unit", "spread"} for r in rows)
    # Every timed figure carries the spread of its repeats; capacities (read from the OS) carry none.
    for r in rows:
        if r["field"]:
            timed = not r["field"].startswith("memory_gib.")
            assert (r["spread"] is not None) == timed, r["field"]
            assert not timed or 1 <= r["spread"] <= MAX_SPREAD, r


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


def test_a_real_quick_calibration_passes_the_checks(quick):
    profile, rows, _ = quick
    assert implausible(profile, rows) == []
    check_figures(profile, rows)
    # Every measured figure of the profile is checked: PLAUSIBLE names all but the capacities.
    sections = profile.to_dict()
    figures = {f"{s}.{n}" for s in ("bandwidth_gbps", "tflops", "quant_ns", "overhead_us") for n in sections[s]}
    assert set(PLAUSIBLE) == figures


def _with(profile, field: str, value: float):
    section, name = field.split(".")
    return dataclasses.replace(profile, **{section: dataclasses.replace(profile.values()[section], **{name: value})})


def test_issue_20s_matmul_figure_is_refused_naming_figure_value_and_limit(quick):
    profile, rows, _ = quick
    slow = _with(profile, "tflops.gpu_matmul", 7.8e-5)  # issue 20's loaded machine
    assert implausible(slow, rows) == ["tflops.gpu_matmul = 7.8e-05 TFLOP/s is outside [0.001, 100], plausible "
                                       "for a cpu device"]
    with pytest.raises(CalibrationError) as err:
        check_figures(slow, rows)
    assert "\n" not in str(err.value) and str(err.value).startswith("calibration refused: tflops.gpu_matmul = 7.8e-05")


def test_every_implausible_figure_is_named_also_too_high(quick):
    profile, rows, _ = quick
    bad = _with(_with(profile, "bandwidth_gbps.gpu_from_cpu", 1e5), "overhead_us.layer", 0.0)
    found = implausible(bad, rows)
    assert len(found) == 2
    assert found[0].startswith("bandwidth_gbps.gpu_from_cpu = 100000 GB/s is outside [0.1, 2000]")
    assert found[1].startswith("overhead_us.layer = 0 us is outside [1, 100000]")


def test_limits_follow_the_device_kind(quick):
    profile, rows, _ = quick
    # packed_weights is measured on a CPU device only: 0 there is a failed measurement, on CUDA it is unused.
    unpacked = _with(profile, "bandwidth_gbps.packed_weights", 0.0)
    assert [p.split(" =")[0] for p in implausible(unpacked, rows)] == ["bandwidth_gbps.packed_weights"]
    assert implausible(dataclasses.replace(unpacked, accelerator=True), rows) == []
    # 0.005 TFLOP/s is a slow CPU's GEMM but no GPU's fp16 GEMM.
    assert implausible(_with(profile, "tflops.gpu_matmul", 0.005), rows) == []
    gpu = dataclasses.replace(_with(profile, "tflops.gpu_matmul", 0.005), accelerator=True)
    assert implausible(gpu, rows) == ["tflops.gpu_matmul = 0.005 TFLOP/s is outside [0.01, 5000], plausible for a "
                                      "cuda device"]


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_lie_within_the_plausible_ranges(name):
    # The ranges must admit every real machine: the shipped ones span a T4 to an H100 and this CPU.
    assert implausible(load_profile(name), []) == []


def test_unstable_repeats_are_refused_naming_the_figure(quick):
    profile, rows, _ = quick
    shaky = [{**r, "spread": 5.0} if r["field"] == "tflops.gpu_matmul" else r for r in rows]
    assert implausible(profile, shaky) == ["tflops.gpu_matmul is unstable: its repeats (matmul cpu) spread 5x, "
                                           "slowest over fastest, above 3x, measured twice"]
    with pytest.raises(CalibrationError, match="^calibration refused: tflops.gpu_matmul is unstable"):
        check_figures(profile, shaky)


def test_a_measurement_whose_repeats_spread_too_far_is_measured_once_more():
    timer = Timer(repeats=3, deadline=Deadline(limit_s=60))
    # The first set has one repeat 10x the others (a preempted run); the second set stands.
    t = timer.series(iter([9.0, 1.0, 10.0, 1.0, 8.0, 2.0, 2.2, 2.1]).__next__, "steady", warmup=1)
    assert (t.seconds, t.spread) == (2.1, pytest.approx(1.1))
    # Spread twice: the second set stands, still unstable, for the profile check to refuse.
    t = timer.series(iter([1.0, 5.0, 1.0, 1.0, 5.0, 1.0]).__next__, "shaky", warmup=0)
    assert (t.seconds, t.spread) == (1.0, 5.0)
    assert timer.series(iter([1.0, 2.9, 1.5]).__next__, "within", warmup=0).spread == pytest.approx(2.9)
    with pytest.raises(ValueError, match="repeats: at least 2"):
        Timer(repeats=1, deadline=Deadline(limit_s=60))


def test_deadline_reports_wall_against_cpu_time():
    waited = Deadline(limit_s=1, wall_start=time.perf_counter() - 100, cpu_start=time.process_time())
    with pytest.raises(CalibrationError) as err:
        waited.check("disk read")
    msg = str(err.value)
    assert msg.startswith("calibration stopped during disk read: 100 s of wall time passed (limit 1 s) for ")
    assert "0% of 1 torch thread(s) busy" in msg and "re-run on a quiet machine" in msg and "\n" not in msg
    # Started 100 s ago with the CPU's clock set back as far: the process computed the whole time.
    busy = Deadline(limit_s=1, wall_start=time.perf_counter() - 100, cpu_start=time.process_time() - 100)
    with pytest.raises(CalibrationError, match="it was computing all along: raise the limit"):
        busy.check("matmul cpu")
    Deadline(limit_s=60).check("matmul cpu")  # within its limit: no error


def test_a_tiny_time_limit_stops_a_real_calibration_naming_the_measurement(tmp_path):
    with pytest.raises(CalibrationError) as err:
        calibrate(device=torch.device("cpu"), offload_dir=str(tmp_path), quick=True, max_seconds=0.001)
    msg = str(err.value)
    assert msg.startswith("calibration stopped during copy gpu_from_cpu: ") and "(limit 0.001 s)" in msg
    assert "CPU time" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # the disk tier's files went with it
    with pytest.raises(ValueError, match="max_seconds: must be > 0"):
        calibrate(device=torch.device("cpu"), offload_dir=str(tmp_path), quick=True, max_seconds=0)


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
    for _ in range(TRIES):
        proc = _cli("--out", str(out), "--offload-dir", str(tmp_path), "--device", "cpu")
        if "unstable" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["this-machine.yaml"]  # no partial file beside it
    profile = load_profile(str(out))
    assert profile.name == "this-machine"
    text = out.read_text()
    assert text.startswith("# Measured by `python run.py calibrate --quick --threads 1 --out ")
    assert "torch threads 1" in text and f"torch {torch.__version__}" in text
    assert "each within its plausible range" in text and "(repeats within " in text
    lines = proc.stdout.splitlines()
    assert any(line.startswith("tflops.gpu_matmul") and "TFLOP/s" in line for line in lines)
    assert lines[-1].startswith("calibration done in") and str(out) in lines[-1]


def test_cli_refused_calibration_writes_nothing_and_exits_1_with_one_line(tmp_path):
    out = tmp_path / "sub" / "refused.yaml"
    proc = _cli("--out", str(out), "--offload-dir", str(tmp_path), "--device", "cpu", "--max-seconds", "0.001")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: calibration stopped during copy gpu_from_cpu: "), proc.stderr
    assert err[0].endswith("; no profile written")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("args, needle", [
    (["--offload-dir", "{tmp}/absent"], "--offload-dir"),
    (["--out", "{tmp}", "--offload-dir", "{tmp}"], "is a directory"),
    (["--threads", "0", "--out", "{tmp}/x.yaml", "--offload-dir", "{tmp}"], "--threads"),
    (["--max-seconds", "0", "--out", "{tmp}/x.yaml", "--offload-dir", "{tmp}"], "--max-seconds"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, args, needle):
    proc = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_quantization_figures_are_nanoseconds_per_element_of_the_runners_quant_code(quick):
    """quant_ns: each figure is one row's median seconds over the tensor's elements, and a figure far off
    (a microsecond per element on a CPU) is refused like any other."""
    profile, rows, _ = quick
    for r in (r for r in rows if r["field"].startswith("quant_ns.")):
        n = int(r["shape"].split("x")[0].lstrip("(")) * int(r["shape"].split("x")[1].split(")")[0])
        assert r["value"] == pytest.approx(r["seconds"] / n * 1e9, rel=1e-3)
    assert any("quant_ns.kv_dequantize_4" in f for f in implausible(_with(profile, "quant_ns.kv_dequantize_4", 5e3),
                                                                    rows))
