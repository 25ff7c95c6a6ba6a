"""Hardware profiles: the shipped files load and cite a source for every figure; bad files give one-line
errors naming the key; dump -> load round-trips."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from runner.memory.pools import Tier
from runner.plan.hardware import PROFILE_DIR, dump_profile, load_profile, shipped_profiles
from runner.spec import JobError

EXPECTED = {"t4-16g", "v100-32g", "h100-80g", "a100-40g", "rtx4090-24g", "cpu-only"}
FIELDS = {"memory_gib": ("gpu", "cpu", "disk"),
          "bandwidth_gbps": ("gpu_from_cpu", "cpu_from_gpu", "cpu_from_disk", "disk_from_cpu", "gpu_memory",
                             "cpu_memory"),
          "tflops": ("gpu_matmul", "gpu_attention", "gpu_recompute", "cpu_matmul", "cpu_attention"),
          "overhead_us": ("layer", "step", "select", "transfer")}
GIB = 2 ** 30


def test_the_expected_profiles_are_shipped():
    assert EXPECTED <= set(shipped_profiles())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_profile_loads_under_its_own_name(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.budget_bytes(Tier.GPU) == pytest.approx(profile.memory_gib.gpu * GIB * profile.usable_fraction)
    assert profile.budget_bytes(Tier.DISK) == pytest.approx(profile.memory_gib.disk * GIB * profile.usable_fraction)


@pytest.mark.parametrize("name", sorted(EXPECTED - {"cpu-only"}))
def test_every_figure_of_a_written_profile_has_a_source_comment(name):
    """Each `key: number` line carries a comment, or its section line does (one source for the section)."""
    section_commented = False
    for line in (PROFILE_DIR / f"{name}.yaml").read_text().splitlines():
        if re.match(r"^\w+:\s*(#.*)?$", line):  # a section header
            section_commented = "#" in line
        elif m := re.match(r"^\s+(\w+):\s*[-\d.]+\s*(#.*)?$", line):
            assert m.group(2) or section_commented, f"{name}: {m.group(1)} has no source comment"


def test_calibrated_cpu_only_profile_lists_the_measurement_behind_every_figure():
    text = (PROFILE_DIR / "cpu-only.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "python run.py calibrate" in header
    gpu_side = [f"{s}.{f}" for s, fs in FIELDS.items() for f in fs if not f.startswith("cpu_") and s != "memory_gib"]
    for key in gpu_side + ["memory_gib.gpu", "memory_gib.cpu", "memory_gib.disk"]:
        assert re.search(rf"^# {re.escape(key)}\s", header, re.M), key


def test_t4_uses_flexgens_fitted_link_and_compute_constants_converted_from_gib():
    t4 = load_profile("t4-16g")
    assert t4.bandwidth_gbps.gpu_from_cpu == pytest.approx(12.89 * GIB / 1e9, rel=1e-3)
    assert t4.bandwidth_gbps.cpu_from_gpu == pytest.approx(4.82 * GIB / 1e9, rel=1e-3)
    # The disk figures are the paper's SSD specs, not the fitted dtoc/ctod (see the profile's comment).
    assert (t4.bandwidth_gbps.cpu_from_disk, t4.bandwidth_gbps.disk_from_cpu) == (2.0, 1.0)
    assert (t4.tflops.gpu_matmul, t4.tflops.gpu_attention, t4.tflops.gpu_recompute) == (21.24, 0.079, 4.3)
    assert t4.tflops.cpu_attention == 0.0123
    # Memory in GiB: the T4's 15,360 MiB (FlexGen's gmem = 15 GiB), and the README's 208 GB and 1.5 TB converted.
    assert (t4.memory_gib.gpu, t4.usable_fraction) == (15.0, 0.9)
    assert (t4.memory_gib.cpu * GIB, t4.memory_gib.disk * GIB) == (pytest.approx(208e9, rel=1e-4),
                                                                    pytest.approx(1500e9, rel=1e-4))


def test_only_the_cpu_only_profile_computes_on_the_cpu():
    assert {name for name in EXPECTED if not load_profile(name).accelerator} == {"cpu-only"}


def test_alisa_machines_have_the_papers_link_and_host():
    for name in ("v100-32g", "h100-80g"):
        p = load_profile(name)
        assert (p.bandwidth_gbps.gpu_from_cpu, p.bandwidth_gbps.cpu_from_gpu) == (20, 20)
        assert p.memory_gib.cpu * GIB == pytest.approx(128e9, rel=1e-4)  # ALISA's 128 GB of DRAM


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dump_then_load_round_trips(tmp_path, name):
    profile = load_profile(name)
    path = tmp_path / "copy.yaml"
    path.write_text(dump_profile(profile, "a header\nof two lines"))
    assert path.read_text().startswith("# a header\n# of two lines\n")
    assert load_profile(str(path)) == profile


def _write_variant(tmp_path: Path, edit) -> str:
    data = yaml.safe_load((PROFILE_DIR / "t4-16g.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("edit, key, problem", [
    (lambda d: d["bandwidth_gbps"].update(pcie=3.0), "bandwidth_gbps.pcie", "unknown key"),
    (lambda d: d["tflops"].update(gpu_matmul=-1.0), "tflops.gpu_matmul", "must be > 0"),
    (lambda d: d["memory_gib"].update(disk=0), "memory_gib.disk", "must be > 0"),
    (lambda d: d.update(memory_gb=d.pop("memory_gib")), "memory_gb", "renamed memory_gib (GiB, 2**30 bytes"),
    (lambda d: d["overhead_us"].update(layer=-5), "overhead_us.layer", "must be >= 0"),
    (lambda d: d["bandwidth_gbps"].update(packed_weights=-1.0), "bandwidth_gbps.packed_weights", "must be >= 0"),
    (lambda d: d["bandwidth_gbps"].update(gpu_memory=0), "bandwidth_gbps.gpu_memory", "must be > 0"),
    (lambda d: d["tflops"].update(cpu_matmul="fast"), "tflops.cpu_matmul", "must be a number"),
    (lambda d: d["bandwidth_gbps"].pop("gpu_memory"), "bandwidth_gbps.gpu_memory", "required"),
    (lambda d: d.update(usable_fraction=1.5), "usable_fraction", "must be in (0, 1]"),
])
def test_bad_value_is_a_one_line_error_naming_the_key(tmp_path, edit, key, problem):
    path = _write_variant(tmp_path, edit)
    with pytest.raises(JobError) as err:
        load_profile(path)
    message = str(err.value)
    assert "\n" not in message and f"{key}: {problem}" in message and path in message


def test_invalid_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmemory_gib: {gpu: 1\n")
    with pytest.raises(JobError, match="not valid YAML") as err:
        load_profile(str(path))
    assert "\n" not in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(JobError) as err:
        load_profile("tpu-v9")
    message = str(err.value)
    assert "\n" not in message and "'tpu-v9'" in message and "t4-16g" in message and err.value.key == "hardware.profile"


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(JobError, match="cannot read") as err:
        load_profile(str(tmp_path / "nope.yaml"))
    assert "\n" not in str(err.value)
