"""The greedy head's bf16 screen (runner/model/greedy_head.py): its bound holds on SmolLM2's real hidden
states and on made-up ones, and it keeps the fp32 argmax where bf16 cannot tell tokens apart."""
from __future__ import annotations

import pytest
import torch

from runner.model import greedy_head, kernels, native, ops as M
from runner.engines.base import generate_batch
from runner.engines.lm import LM, Batch
from runner.engines.sampling import SamplingParams


@pytest.fixture(scope="module")
def smollm2_states(smollm2_lm, smollm2_loaded, austen_text):
    """Final-norm outputs (the head's inputs) of real greedy decoding over Austen: (n, e)."""
    _, _, tok = smollm2_loaded
    head = smollm2_lm.units[-1]
    ids = tok.encode(austen_text[:20000])
    prompts = [ids[s:s + 48] for s in range(0, 8 * 400, 400)]
    states = []
    forward = head.forward

    def keep(w, h, state):
        states.append(M.rms_norm(h[:, -1], w["ln_w"], smollm2_lm.cfg.norm_eps))
        return forward(w, h, state)

    head.forward = keep
    try:
        generate_batch(smollm2_lm, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), tok)
    finally:
        del head.forward  # the class's method again
    return torch.cat(states)


def _screen(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    built = greedy_head.build_screen(w)
    return built[greedy_head.SCREEN], built[greedy_head.NORMS]


def _assert_bound_holds(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    screen, norms = _screen(w)
    xb = x.to(torch.bfloat16)
    a = kernels.linear(xb, screen).float()  # (b, v)
    exact = x.double() @ w.double().t()  # (b, v)
    bound = greedy_head.screen_bound(x, xb, a.abs().amax(dim=-1), norms)
    gap = (a.double() - exact).abs()
    assert bool((gap <= bound[:, None].double()).all()), f"worst gap/bound {(gap / bound[:, None]).max():.3f}"
    return gap.amax(dim=-1) / bound


def test_bound_holds_on_real_hidden_states(smollm2_states, smollm2_loaded):
    _, weights, _ = smollm2_loaded
    ratio = _assert_bound_holds(smollm2_states, weights["head.lm_w"])
    # Not vacuous: the bound is within a small factor of the worst real gap.
    assert float(ratio.max()) > 0.05


def test_bound_holds_with_outlier_features():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 96, generator=g) * 0.05
    x = torch.randn(16, 96, generator=g)
    x[:, 7] *= 300.0  # one huge channel, as LLM hidden states have
    x[3] = 0.0
    _assert_bound_holds(x, w)


def test_argmax_and_candidates_equal_the_fp32_head(smollm2_states, smollm2_loaded):
    _, weights, _ = smollm2_loaded
    w = weights["head.lm_w"]
    full = M.lm_head(smollm2_states, w)
    screen = _screen(w)
    assert torch.equal(greedy_head.greedy_tokens(smollm2_states, w, *screen), full.argmax(dim=-1))
    rows, cols, logits = greedy_head.screened_candidates(smollm2_states, w, *screen)
    torch.testing.assert_close(logits, full[rows, cols], rtol=1e-5, atol=1e-4)
    # Few candidates per row, or it would save nothing.
    assert torch.bincount(rows, minlength=len(full)).float().median() <= 50


def test_near_ties_the_bf16_screen_ranks_wrongly_keep_the_fp32_winner():
    # Each row's two best tokens are a hair apart: far below what bf16 resolves of a logit near 10,
    # far above fp32 rounding. The screen ranks many pairs the wrong way round; the bound must keep
    # both and let fp32 decide.
    g = torch.Generator().manual_seed(1)
    e, pairs = 64, 200
    x = torch.randn(pairs, e, generator=g)
    base = torch.randn(pairs, e, generator=g) * 0.01 + x / x.norm(dim=-1, keepdim=True) * 0.3
    w = torch.cat([base, base + torch.randn(pairs, e, generator=g) * 2e-4, torch.randn(500, e, generator=g) * 0.01])
    exact = x.double() @ w.double().t()  # (pairs, 2 * pairs + 500)
    winners = exact.argmax(dim=-1)
    idx = torch.arange(pairs)
    assert bool(((winners == idx) | (winners == idx + pairs)).all())  # the test's own premise
    screened = kernels.linear(x.to(torch.bfloat16), _screen(w)[0]).float()
    wrong_way = screened.argmax(dim=-1) != winners
    assert int(wrong_way.sum()) >= 10, "premise: bf16 alone picks the wrong token of many pairs"
    assert torch.equal(greedy_head.greedy_tokens(x, w, *_screen(w)), winners)


def test_a_bf16_heads_own_screen_keeps_the_fp32_winner_of_its_near_ties():
    # A bf16 model: x and w are bf16, its true logits the fp32 sums of their (exact) products. Its bf16
    # head output rounds each logit to 8 bits, so near-ties come out tied or the wrong way round; the
    # screen (the head itself, packed) with an fp32 recheck must keep the fp32 winner.
    g = torch.Generator().manual_seed(4)
    e, pairs = 64, 200
    x = torch.randn(pairs, e, generator=g).bfloat16()
    base = torch.randn(pairs, e, generator=g) * 0.01 + x.float() / x.float().norm(dim=-1, keepdim=True) * 0.3
    w = torch.cat([base, base + torch.randn(pairs, e, generator=g) * 1e-3, torch.randn(500, e, generator=g) * 0.01])
    w = w.bfloat16()
    exact = x.double() @ w.double().t()
    winners = exact.argmax(dim=-1)
    plain = kernels.linear(x, w).argmax(dim=-1)  # the bf16 head alone
    assert int((plain != winners).sum()) >= 10, "premise: bf16 logits break many near-ties wrongly"
    screen, norms = _screen(w)
    assert float(norms[1]) == 0.0  # w is its own bf16 rounding
    assert torch.equal(greedy_head.greedy_tokens(x, w, screen, norms), winners)


def test_non_finite_states_get_the_full_logits():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(200, 32, generator=g), torch.randn(3, 32, generator=g)
    x[1, 4] = float("inf")
    rows, cols, logits = greedy_head.screened_candidates(x, w, *_screen(w))
    assert rows is None and cols is None and torch.equal(logits, M.lm_head(x, w))
    assert torch.equal(greedy_head.greedy_tokens(x, w, *_screen(w)), M.lm_head(x, w).argmax(dim=-1))


def test_flat_logits_take_the_full_head_instead_of_rechecking_most_of_the_vocabulary():
    # A head whose rows are nearly one row (a degenerate or untrained model): bf16 cannot rank
    # them, so nearly every token is a candidate and the fp32 head is the cheaper way.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 64, generator=g) + torch.randn(5000, 64, generator=g) * 1e-4
    x = torch.randn(4, 64, generator=g)
    rows, _, logits = greedy_head.screened_candidates(x, w, *_screen(w))
    assert rows is None and logits.shape == (4, 5000)
    assert torch.equal(greedy_head.greedy_tokens(x, w, *_screen(w)), M.lm_head(x, w).argmax(dim=-1))


@pytest.mark.parametrize("kind", ["llama_gqa_tied", "llama_mha"])
def test_screened_generation_equals_plain_generation(hf_checkpoints, kind):
    from runner.model.weights import load_model
    loaded = load_model(name=None, path=str(hf_checkpoints[kind]), dtype=torch.float32, device="cpu")
    lms = {s: LM(loaded.config, dict(loaded.weights), torch.device("cpu"), torch.float32, screen=s)
           for s in (True, False)}
    assert greedy_head.SCREEN in lms[True].unit_weights[-1]
    assert not lms[True].unit_weights[-1]["lm_w"].is_mkldnn  # candidates index its rows
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]
    outs = {s: [q.token_ids for q in generate_batch(lm, prompts, SamplingParams(max_new_tokens=10, ignore_eos=True),
                                                    loaded.tokenizer).sequences]
            for s, lm in lms.items()}
    assert outs[True] == outs[False]
    # Not greedy (sampling, scoring): the screened LM returns the full fp32 logits.
    with torch.inference_mode():
        full = {s: Batch(lm, prompts, 2).prefill() for s, lm in lms.items()}
        greedy = {s: Batch(lm, prompts, 2, greedy=True).prefill() for s, lm in lms.items()}
    torch.testing.assert_close(full[True], full[False], rtol=1e-5, atol=1e-5)
    for tokens in greedy.values():
        assert torch.equal(tokens, full[False].argmax(-1))


def test_screen_is_chosen_only_where_bf16_dot_products_pay(monkeypatch):
    monkeypatch.delenv(kernels.SCREEN_ENV, raising=False)
    assert not kernels.bf16_screen(torch.device("cpu"), torch.float16)
    assert not kernels.bf16_screen(torch.device("cuda"), torch.float32)
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & native.cpu_flags())
    for dtype in (torch.float32, torch.bfloat16):
        assert kernels.bf16_screen(torch.device("cpu"), dtype) == (has_bf16 and kernels._ONEDNN)
    monkeypatch.setenv(kernels.SCREEN_ENV, "0")
    assert not kernels.bf16_screen(torch.device("cpu"), torch.float32)
