"""Perplexity under KV policies on the real SmolLM2 and real Austen text: HF transformers' dense
perplexity is the oracle; a policy whose budget covers everything must equal dense exactly, and an
80%-sparse recent window must measurably hurt."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import AUSTEN
from runner.eval.perplexity import read_paragraphs, score_windows, text_windows
from runner.kv.spec import KVSpec
from runner.engines.lm import LM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT, PREFILL, WINDOWS = 144, 64, 2


@pytest.fixture(scope="module")
def lm(smollm2_lm) -> LM:
    return smollm2_lm


@pytest.fixture(scope="module")
def windows(smollm2_loaded) -> list[list[int]]:
    if not AUSTEN.is_file():
        pytest.skip(f"{AUSTEN} not found")
    return text_windows([AUSTEN], smollm2_loaded[2].encode, CONTEXT, WINDOWS)


@pytest.fixture(scope="module")
def dense(lm, windows):
    return score_windows(lm, windows, PREFILL, KVSpec().settings(), batch_size=WINDOWS)


def test_read_paragraphs_joins_wrapped_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Title\n\n\nFirst line of a\nwrapped paragraph.\n\n   Indented\nsecond.\n", encoding="utf-8")
    assert read_paragraphs(path) == "Title\n\nFirst line of a wrapped paragraph.\n\nIndented second."


def test_windows_are_spread_over_the_text(smollm2_loaded, windows):
    ids = smollm2_loaded[2].encode(read_paragraphs(AUSTEN))
    n = len(ids) // CONTEXT
    assert windows[0] == ids[:CONTEXT]
    assert windows[1] == ids[(n // 2) * CONTEXT:(n // 2 + 1) * CONTEXT]  # not the second window
    with pytest.raises(ValueError, match="eval.windows"):
        text_windows([AUSTEN], smollm2_loaded[2].encode, CONTEXT, n + 1)


def test_dense_perplexity_equals_hf(hf_smollm2, windows, dense):
    model, _ = hf_smollm2
    ids = torch.tensor(windows)
    with torch.inference_mode():
        logits = model(ids).logits[:, PREFILL - 1:-1].double()  # position t predicts token t + 1
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, PREFILL:, None]).squeeze(-1)
    assert dense.tokens == nll.numel() == WINDOWS * (CONTEXT - PREFILL)
    expected = math.exp(float(nll.mean()))
    assert dense.perplexity == pytest.approx(expected, rel=1e-3)
    assert 5 < expected < 200  # real prose, a real model: a sanity check on the oracle itself


def test_budget_covering_the_window_equals_dense(lm, windows, dense):
    full = score_windows(lm, windows, PREFILL, KVSpec(policy="local", budget_tokens=CONTEXT).settings(),
                         batch_size=WINDOWS)
    assert (full.nll_sum, full.tokens) == (dense.nll_sum, dense.tokens)


def test_sparse_recent_window_is_worse(lm, windows, dense):
    # batch_size 1 also checks that batching does not change what is measured
    sparse = score_windows(lm, windows, PREFILL, KVSpec(policy="local", sparsity=0.8).settings(), batch_size=1)
    assert sparse.tokens == dense.tokens
    assert sparse.perplexity > 1.1 * dense.perplexity
