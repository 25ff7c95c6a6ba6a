"""Perplexity under a KV policy, measured exactly as generation runs.

Each window of `context_len` tokens is split: the first `prefill_len` tokens are prefilled
(densely, as every prompt), the rest are fed one token at a time with the policy active
(teacher forcing). The prefill's logits predict token `prefill_len`, each decode step's logits
the token after the one fed, so a window scores `context_len - prefill_len` tokens and makes
one decode step fewer. Perplexity = exp(mean NLL) over every scored token of every window.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runner.data.dataset import reflow_paragraphs
from runner.kv.spec import KVSettings
from runner.engines.lm import LM, Batch


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    nll_sum: float  # summed natural-log NLL of every scored token
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def read_paragraphs(path: str | Path) -> str:
    """A hard-wrapped text file as paragraphs (so the model sees prose, not Gutenberg's 70-column wrap)."""
    return reflow_paragraphs(Path(path).read_text(encoding="utf-8"))


def text_windows(paths: Sequence[str | Path], encode: Callable[[str], list[int]], context_len: int,
                 count: int) -> list[list[int]]:
    """`count` non-overlapping windows of `context_len` tokens, evenly spaced over the text.

    The files' paragraphs are joined (in order, a blank line between files) and tokenized once;
    of the n whole windows it holds, windows i * n // count are taken, so every file contributes
    in proportion to its length instead of the first file alone.
    """
    ids = encode("\n\n".join(read_paragraphs(p) for p in paths))
    n = len(ids) // context_len
    if n < count:
        raise ValueError(f"eval.windows: the text holds {n} windows of {context_len} tokens, {count} requested")
    starts = [(i * n // count) * context_len for i in range(count)]
    return [ids[s:s + context_len] for s in starts]


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(b, v) logits, (b,) targets -> (b,) NLL in float64 (summing ~16k of them in fp32 loses digits)."""
    return -torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def score_windows(lm: LM, windows: Sequence[Sequence[int]], prefill_len: int, kv: KVSettings,
                  batch_size: int, on_window: Callable[[int], None] | None = None) -> PerplexityResult:
    """Teacher-forced NLL of tokens prefill_len.. of each window, `batch_size` windows per batch."""
    nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        total = _score_batch(lm, chunk, prefill_len, kv)
        nll += float(total.sum())
        tokens += total.numel()
        if on_window is not None:
            on_window(len(chunk))
    return PerplexityResult(nll_sum=nll, tokens=tokens)


def _score_batch(lm: LM, windows: Sequence[Sequence[int]], prefill_len: int, kv: KVSettings) -> Tensor:
    """(b, context_len - prefill_len) NLLs of one batch of equal-length windows."""
    ids = torch.tensor([list(w) for w in windows], dtype=torch.long, device=lm.device)
    steps = ids.shape[1] - prefill_len - 1  # decode steps: the last token is scored, never fed
    with torch.inference_mode():
        batch = Batch(lm, [w[:prefill_len] for w in ids.tolist()], steps, kv)
        nll = [_nll(batch.prefill(), ids[:, prefill_len])]
        for t in range(prefill_len, prefill_len + steps):
            nll.append(_nll(batch.decode(ids[:, t]), ids[:, t + 1]))
    return torch.stack(nll, dim=1)
