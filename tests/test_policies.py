"""Each policy's selection on hand-built inputs, with exact expected indices."""
from __future__ import annotations

import pytest
import torch

from policies import ScoreMode, get_policy, policy_names

CPU = torch.device("cpu")
SPARSE = [p for p in policy_names() if p != "dense"]


def _scores(policy: str, rows: list[list[float]]) -> torch.Tensor | None:
    if get_policy(policy, budget_tokens=2).scoring is None:
        return None
    t = torch.tensor(rows)
    return t[:, None, :]  # (b, 1, n)


@pytest.mark.parametrize("name", SPARSE)
def test_budget_at_least_length_selects_everything(name):
    p = get_policy(name, budget_tokens=10)
    assert p.select(10, 10, _scores(name, [[0.1] * 10]), CPU) is None
    assert p.select(7, 7, _scores(name, [[0.1] * 7]), CPU) is None


@pytest.mark.parametrize("name", SPARSE)
def test_ordered_selection_is_ascending_within_budget_and_keeps_the_newest(name):
    torch.manual_seed(0)
    n = 50
    p = get_policy(name, sparsity=0.8)
    sel = p.select(n, n, _scores(name, torch.rand(2, n).tolist()), CPU)
    assert sel is not None
    assert torch.equal(sel.index(n, CPU).sort(dim=-1).values, sel.ordered().index(n, CPU))  # same set
    idx = sel.ordered().index(n, CPU)
    for row in idx.reshape(-1, idx.shape[-1]):
        assert row.tolist() == sorted(set(row.tolist())), "indices must be unique and ascending"
        assert row[-1].item() == n - 1
        assert len(row) == p.budget(n) == 10  # k = round(50 * 0.2 / 2) = 5 local + 5 other


def test_ratio_budget_follows_alisa_alg1():
    # k = round(n * r / 2) local + k global: 80% sparsity at n = 1000 keeps 100 + 100.
    p = get_policy("swa", sparsity=0.8)
    assert p.split(1000) == (100, 100)
    assert p.split(23) == (2, 2)  # round(2.3)
    assert get_policy("swa", budget_tokens=7).split(1000) == (4, 3)


def test_local_keeps_the_most_recent():
    assert get_policy("local", budget_tokens=4).select(10, 10, None, CPU).index(10, CPU).tolist() == [6, 7, 8, 9]


def test_streaming_keeps_sinks_and_recent():
    p = get_policy("streaming", budget_tokens=6, sinks=2)
    assert p.select(12, 12, None, CPU).index(12, CPU).tolist() == [0, 1, 8, 9, 10, 11]


def test_strided_keeps_window_and_every_sth_older_token():
    # budget 6: 3 recent (9, 10, 11) + 3 strided over the 9 older slots: stride 3 back from slot 8.
    p = get_policy("strided", budget_tokens=6)
    sel = p.select(12, 12, None, CPU)
    assert sel.picks.tolist() == [2, 5, 8] and sel.recent == 3
    assert sel.index(12, CPU).tolist() == [2, 5, 8, 9, 10, 11]


def test_swa_picks_top_local_sum_outside_the_window():
    # budget 4: 2 recent (slots 6, 7) + top-2 of slots 0..5 by score; slot 7's huge score is
    # inside the window, so it must not take a global place (no overlap).
    scores = torch.tensor([[[0.5, 0.1, 0.9, 0.2, 0.05, 0.3, 0.0, 5.0]]])
    sel = get_policy("swa", budget_tokens=4).select(8, 8, scores, CPU)
    assert sel.picks.sort(dim=-1).values.tolist() == [[[0, 2]]] and sel.recent == 2
    assert sel.ordered().index(8, CPU).tolist() == [[[0, 2, 6, 7]]]


def test_h2o_selects_per_kv_head():
    scores = torch.tensor([[[0.9, 0.1, 0.2, 0.3, 0.0, 0.0],     # head 0: slots 0, 3
                            [0.1, 0.8, 0.7, 0.2, 0.0, 0.0]]])   # head 1: slots 1, 2
    sel = get_policy("h2o", budget_tokens=4).select(6, 6, scores, CPU)
    assert sel.ordered().index(6, CPU).tolist() == [[[0, 3, 4, 5], [1, 2, 4, 5]]]


def test_policies_differ_in_scoring_rules():
    assert get_policy("h2o", sparsity=0.5).scoring.per_head
    assert get_policy("h2o", sparsity=0.5).scoring.permanent
    swa = get_policy("swa", sparsity=0.5)
    assert not swa.scoring.per_head and not swa.scoring.permanent and swa.scoring.mode is ScoreMode.WINDOW
    assert get_policy("swa", sparsity=0.5, score="decay").scoring.mode is ScoreMode.DECAY
    assert swa.score_window(1000) == 250  # the paper's window: k steps
    assert get_policy("swa", sparsity=0.5, window=16).score_window(1000) == 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope"), r"kv.policy: unknown policy 'nope'"),
    (dict(name="swa", sparsity=1.0), r"kv.sparsity: must be in \[0, 1\)"),
    (dict(name="swa", sparsity=0.5, budget_tokens=8), r"give one budget"),
    (dict(name="local", sparsity=0.5, sinks=4), r"kv.sinks: not a parameter of policy 'local'"),
    (dict(name="swa", sparsity=0.5, score="all"), r"kv.score"),
    (dict(name="dense", sparsity=0.5), r"dense keeps every token"),
])
def test_bad_parameters_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_policy(kwargs.pop("name"), **kwargs)
