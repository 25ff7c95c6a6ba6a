"""Token score accumulation: windowed (SWA), all-queries (H2O), decayed; prompt fade; permanence."""
from __future__ import annotations

import torch

from policies import ScoreMode, Scoring
from runner.kv.scores import ScoreState


def _state(mode: ScoreMode, track_alive: bool = False, groups: int = 1) -> ScoreState:
    return ScoreState(Scoring(mode=mode, per_head=groups > 1, permanent=track_alive), batch=2, groups=groups,
                      max_len=12, dtype=torch.float64, device=torch.device("cpu"), track_alive=track_alive)


def _rows(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sparse rows like decode steps produce: per row, 4 attended positions and their weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        pos = torch.stack([torch.randperm(8, generator=g)[:4].sort().values for _ in range(2)])[:, None]  # (2, 1, 4)
        out.append((pos, torch.rand(2, 1, 4, generator=g, dtype=torch.float64)))
    return out


def _dense(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    acc = torch.zeros(2, 1, 12, dtype=torch.float64)
    for pos, w in rows:
        acc.scatter_add_(-1, pos, w)
    return acc


def test_window_sum_is_exactly_the_last_w_rows():
    state, rows = _state(ScoreMode.WINDOW), _rows(9)
    for pos, w in rows:
        state.observe(pos, w, window=3)
    torch.testing.assert_close(state.current(12, 3), _dense(rows[-3:]), rtol=0, atol=1e-12)


def test_all_mode_sums_every_row_and_decay_weights_by_age():
    rows = _rows(6)
    full, decay = _state(ScoreMode.ALL), _state(ScoreMode.DECAY)
    for pos, w in rows:
        full.observe(pos, w, window=4)
        decay.observe(pos, w, window=4)
    torch.testing.assert_close(full.current(12, 4), _dense(rows), rtol=0, atol=1e-12)
    gamma = 0.75  # 1 - 1/window
    expected = sum(gamma ** (len(rows) - 1 - t) * _dense([r]) for t, r in enumerate(rows))
    torch.testing.assert_close(decay.current(12, 4), expected, rtol=0, atol=1e-12)


def test_prompt_rows_fade_out_over_the_window():
    state = _state(ScoreMode.WINDOW)
    first, weights = state.prompt_weights(10, window=4)
    assert first == 6 and weights.tolist() == [1.0] * 4  # the last 4 prompt queries
    prompt = torch.rand(2, 1, 10, dtype=torch.float64)
    state.set_prompt(slice(None), prompt)
    torch.testing.assert_close(state.current(10, 4), prompt)
    pos, w = _rows(1)[0]
    state.observe(pos, w, window=4)
    expected = _dense([(pos, w)])[..., :10] + 0.75 * prompt  # one of 4 prompt rows has left the window
    torch.testing.assert_close(state.current(10, 4), expected)
    for pos, w in _rows(3, seed=1):
        state.observe(pos, w, window=4)
    assert state.prompt is not None
    state.current(10, 4)
    assert state.prompt is None  # fully faded after `window` steps, and freed


def test_decay_prompt_weights_age_geometrically():
    first, weights = _state(ScoreMode.DECAY).prompt_weights(30, window=2)
    assert first == 22  # 4 windows back: older weights are below e^-4
    torch.testing.assert_close(weights, 0.5 ** torch.arange(7, -1, -1, dtype=torch.float64))


def test_permanent_eviction_marks_dropped_tokens_dead():
    state = _state(ScoreMode.ALL, track_alive=True, groups=2)
    state.set_prompt(slice(None), torch.ones(2, 2, 6, dtype=torch.float64))
    state.keep_only(6, torch.tensor([[[0, 4, 5], [1, 4, 5]]] * 2))
    cur = state.current(8, 4)
    assert torch.isinf(cur[0, 0, [1, 2, 3]]).all() and torch.isfinite(cur[0, 0, [0, 4, 5, 6, 7]]).all()
    assert torch.isinf(cur[1, 1, [0, 2, 3]]).all() and cur[1, 1, 1] == 1.0
