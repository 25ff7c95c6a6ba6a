"""The job's `hardware` section (runner/hardware_spec.py): the emulated link, nested keys, tier options."""
from __future__ import annotations

import pytest

from runner.hardware_spec import Device, LinkSpec
from runner.job import JobError, job_from_dict, load_job
from test_job import FULL_JOB, minimal, write


def test_link_parses_round_trips_and_is_set_by_nested_overrides(tmp_path):
    job = job_from_dict(minimal(offload={}, hardware={"link": {"gbps": 0.02, "emulate": True}}))
    assert job.hardware.link == LinkSpec(gbps=0.02, emulate=True)
    assert job_from_dict(job.to_dict()) == job
    assert job_from_dict(minimal(offload={})).hardware.link is None
    path = write(tmp_path, "name: t\nmodel: {name: x}\ndataset: {path: p.jsonl}\noffload: {}\n"
                           "hardware: {link: {gbps: 16, emulate: false}}\n")
    assert load_job(path).hardware.link == LinkSpec(gbps=16.0, emulate=False)
    # A nested override changes one key of the mapping, or builds it where the file has none.
    assert load_job(path, ["hardware.link.gbps=0.5"]).hardware.link == LinkSpec(gbps=0.5, emulate=False)
    bare = write(tmp_path, "name: t\nmodel: {name: x}\ndataset: {path: p.jsonl}\noffload: {}\n", "bare.yaml")
    job = load_job(bare, ["hardware.link.gbps=0.02", "hardware.link.emulate=true"])
    assert job.hardware.link == LinkSpec(gbps=0.02, emulate=True) and job.hardware.device is Device.AUTO
    swept = job_from_dict(minimal(offload={}, hardware={"link": {"gbps": 1, "emulate": True}},
                                  sweep={"hardware.link.gbps": [0.02, 20]}))
    assert [p.hardware.link.gbps for _, p in swept.sweep_points()] == [0.02, 20.0]


@pytest.mark.parametrize("sections, key, detail", [
    ({"hardware": {"link": {"gbps": 0, "emulate": True}}, "offload": {}}, "hardware.link.gbps", "must be > 0, got 0"),
    ({"hardware": {"link": {"gbps": -2, "emulate": True}}, "offload": {}}, "hardware.link.gbps", "must be > 0"),
    ({"hardware": {"link": {"gbps": 1, "emulate": True, "latency": 1}}, "offload": {}}, "hardware.link.latency",
     "unknown key (known: gbps, emulate)"),
    ({"hardware": {"link": {"gbps": 1}}, "offload": {}}, "hardware.link.emulate", "required"),
    ({"hardware": {"link": {"emulate": True}}, "offload": {}}, "hardware.link.gbps", "required"),
    ({"hardware": {"link": {"gbps": "fast", "emulate": True}}, "offload": {}}, "hardware.link.gbps", "must be a number"),
    ({"hardware": {"link": {"gbps": 1, "emulate": "yes"}}, "offload": {}}, "hardware.link.emulate", "must be true or false"),
    ({"hardware": {"link": 20}, "offload": {}}, "hardware.link", "must be a mapping"),
    ({"hardware": {"link": {"gbps": 1, "emulate": True}}}, "hardware.link", "only used with an offload section"),
    ({"hardware": {"disk_page_cache": False}}, "hardware.disk_page_cache", "only used with an offload section"),
])
def test_bad_link_values_name_the_key(sections, key, detail):
    with pytest.raises(JobError) as e:
        job_from_dict(minimal(**sections))
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and detail in msg and "\n" not in msg, msg


@pytest.mark.parametrize("item, match", [
    ("hardware.link.gbs=1", r"hardware.link.gbs: unknown key \(known: gbps, emulate\)"),
    ("hardware.device.x=1", r"hardware.device.x: 'hardware.device' is not a section"),
    ("hardware.lnk.gbps=1", r"hardware.lnk.gbps: unknown key \(known: device, num_threads"),
])
def test_bad_nested_override_keys(tmp_path, item, match):
    with pytest.raises(JobError, match=match):
        load_job(write(tmp_path, FULL_JOB), [item])


def test_disk_page_cache_option():
    assert job_from_dict(minimal(offload={})).hardware.disk_page_cache is True
    job = job_from_dict(minimal(offload={}, hardware={"disk_page_cache": False}))
    assert job.hardware.disk_page_cache is False
