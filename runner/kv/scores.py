"""Per-layer token scores for the policies that select by attention (H2O, SWA).

Scores live in position space, (b, g, L) for L = prompt + generated tokens, whatever the
KV storage does: evicting or compacting slots never has to remap them, and they cost
L floats per sequence and layer, ~1/(2 * kvh * d) of the dense KV they stand in for.

How the modes accumulate (policy `Scoring.mode`):
- ALL (H2O): every query's attention row is added, prompt queries included.
- WINDOW (SWA, ALISA Alg. 1): the sum of the rows of the last `window` decode steps. Each
  step's row is kept sparse (the attended positions and their weights) and subtracted
  when it leaves the window. The prompt is what the paper leaves open: the first
  selection uses the rows of the last `window` prompt queries (ours, like SnapKV's
  observation window). Those rows are not stored one by one (window x prompt floats per
  sequence and layer would rival the KV itself); their sum fades out linearly over the
  first `window` decode steps, as if one average prompt row left per step.
- DECAY (ours): acc = gamma * acc + row with gamma = 1 - 1/window, no rows stored; the
  prompt is weighted the same way (queries older than 4 windows, weight < e^-4, skipped).
"""
from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from policies.base import ScoreMode, Scoring


class ScoreState:
    def __init__(self, scoring: Scoring, batch: int, groups: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, track_alive: bool):
        self.mode = scoring.mode
        self.acc = torch.zeros((batch, groups, max_len), dtype=dtype, device=device)
        self.prompt: Tensor | None = None  # WINDOW: summed prompt rows, fading out
        self.rows: deque[tuple[Tensor | None, Tensor]] = deque()  # WINDOW: (positions, weights) per step
        # H2O's permanence in retain mode: a dropped token is marked dead, never re-selected.
        self.alive = torch.ones((batch, groups, max_len), dtype=torch.bool, device=device) if track_alive else None
        self.steps = 0  # decode steps observed

    def prompt_weights(self, s: int, window: int) -> tuple[int, Tensor]:
        """(first scored query, weight of each query from there on) for a prompt of s tokens."""
        if self.mode is ScoreMode.ALL:
            return 0, torch.ones(s, dtype=self.acc.dtype, device=self.acc.device)
        if self.mode is ScoreMode.WINDOW:
            first = max(0, s - window)
            return first, torch.ones(s - first, dtype=self.acc.dtype, device=self.acc.device)
        first = max(0, s - 4 * window)
        age = torch.arange(s - first - 1, -1, -1, dtype=self.acc.dtype, device=self.acc.device)
        return first, (1.0 - 1.0 / window) ** age

    def set_prompt(self, rows: slice, sums: Tensor) -> None:
        """sums: (rows, g, s) weighted prompt attention for these batch rows."""
        s = sums.shape[-1]
        if self.mode is ScoreMode.WINDOW:
            if self.prompt is None:
                self.prompt = torch.zeros_like(self.acc[..., :s])
            self.prompt[rows] = sums
        else:
            self.acc[rows, :, :s] = sums

    def current(self, n: int, window: int) -> Tensor:
        """Scores of positions 0..n: (b, g, n); -inf on dead tokens."""
        scores = self.acc[..., :n]
        if self.prompt is not None:
            fade = 1.0 - self.steps / window
            if fade <= 0:
                self.prompt = None
            else:
                scores = scores.clone()
                scores[..., :self.prompt.shape[-1]] += fade * self.prompt
        if self.alive is not None:
            scores = scores.masked_fill(~self.alive[..., :n], float("-inf"))
        return scores

    def observe(self, positions: Tensor | None, weights: Tensor, window: int) -> None:
        """Add one decode step's attention: weights (b, g, m) at positions (b|1, g|1, m), None = 0..m."""
        weights = weights.to(self.acc.dtype)  # a 16-bit model's probabilities (the torch decode path)
        if self.mode is ScoreMode.DECAY:
            self.acc.mul_(1.0 - 1.0 / window)
        self._add(positions, weights)
        if self.mode is ScoreMode.WINDOW:
            # int32 positions: the window's rows are this mode's main memory cost.
            self.rows.append((None if positions is None else positions.to(torch.int32), weights))
            while len(self.rows) > window:
                old_pos, old_w = self.rows.popleft()
                self._add(None if old_pos is None else old_pos.long(), -old_w)
        self.steps += 1

    def keep_only(self, n: int, index: Tensor) -> None:
        """Permanent eviction: of positions 0..n only `index` (m,) or (b, g, m) stay alive."""
        if self.alive is None:
            return
        kept = torch.zeros_like(self.alive[..., :n])
        if index.dim() == 1:
            kept[..., index] = True
        else:
            kept.scatter_(-1, index, True)
        self.alive[..., :n] &= kept

    def select_rows(self, index: Tensor) -> "ScoreState":
        """A copy holding batch rows `index` (b',) of this state."""
        out = ScoreState.__new__(ScoreState)
        out.mode, out.steps = self.mode, self.steps
        out.acc = self.acc[index]
        out.prompt = None if self.prompt is None else self.prompt[index]
        out.alive = None if self.alive is None else self.alive[index]
        out.rows = deque((p if p is None or p.dim() == 1 else p[index], w[index]) for p, w in self.rows)
        return out

    def _add(self, positions: Tensor | None, weights: Tensor) -> None:
        if positions is None:
            self.acc[..., :weights.shape[-1]] += weights
        else:
            self.acc.scatter_add_(-1, positions.expand_as(weights), weights)
