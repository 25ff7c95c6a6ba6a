"""runner/spec.py: the YAML text of a job (bounded, duplicate keys refused) and generic coercion."""
from __future__ import annotations

import time

import pytest

from runner.job import load_job
from runner.spec import MAX_YAML_NODES, JobError, load_yaml, parse_override


def _bomb(levels: int) -> str:
    """The billion-laughs shape: each level is a list of ten aliases of the one before."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    job = tmp_path / "bomb.yaml"
    job.write_text("name: t\nmodel: {name: opt-125m}\ndataset: {path: p.jsonl}\n" + _bomb(9))  # 10^9 nodes
    start = time.monotonic()
    with pytest.raises(JobError, match=rf"^{job}: the YAML expands to more than 100,000 nodes"):
        load_job(job)
    assert time.monotonic() - start < 5  # expanding it would take minutes and tens of GB


def test_an_override_bomb_and_a_self_holding_alias_are_refused():
    value = "{" + ", ".join(f"l{i}: " + line.split(": ", 1)[1] for i, line in enumerate(_bomb(7).splitlines())) + "}"
    with pytest.raises(JobError, match=r"^override .*expands to more than"):
        parse_override("generation.stop=" + value)
    with pytest.raises(JobError, match="expands to more than"):
        load_yaml("a: &a [1, *a]\n", "job.yaml")


def test_aliases_within_the_bound_still_work():
    text = _bomb(4)  # 10^4 strings: large, but a real sweep can be that large
    data = load_yaml(text, "job.yaml")
    assert len(data["l3"]) == 10 and data["l3"][0][0][0] == data["l0"]
    assert 10 ** 4 < MAX_YAML_NODES
    assert load_yaml("", "job.yaml") is None
