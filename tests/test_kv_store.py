"""The KV store with every policy, on the real SmolLM2 and real text: dense equivalences,
retain vs evict, memory bounds, quantized storage, padding and forking."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from policies import get_policy, policy_names
from runner.kv.spec import KVSettings, KVSpec
from runner.kv.store import KVStore, kv_bytes
from runner.engines.lm import LM, Batch
from runner.model.config import LLAMA_ARCH, ModelConfig
from test_ops import padded_mask, reference

SPARSE = [p for p in policy_names() if p != "dense"]
PROMPT, STEPS = 96, 24


@pytest.fixture(scope="module")
def lm(smollm2_lm) -> LM:
    return smollm2_lm


@pytest.fixture(scope="module")
def ids(smollm2_loaded, austen_text) -> list[int]:
    return smollm2_loaded[2].encode(austen_text)[:PROMPT + STEPS + 40]


def _run(lm: LM, prompts: list[list[int]], feed: list[list[int]], spec: KVSpec | KVSettings
         ) -> tuple[torch.Tensor, Batch]:
    """Prefill `prompts`, then teacher-force `feed` (one list per row); stacked logits (steps + 1, b, v)."""
    with torch.inference_mode():
        batch = Batch(lm, prompts, len(feed[0]), spec if isinstance(spec, KVSettings) else spec.settings())
        out = [batch.prefill()]
        for t in range(len(feed[0])):
            out.append(batch.decode(torch.tensor([f[t] for f in feed])))
    return torch.stack(out), batch


def _two_rows(ids: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    return [ids[:PROMPT], ids[20:20 + PROMPT]], [ids[PROMPT:PROMPT + STEPS], ids[20 + PROMPT:20 + PROMPT + STEPS]]


@pytest.fixture(scope="module")
def dense(lm, ids) -> torch.Tensor:
    return _run(lm, *_two_rows(ids), KVSpec())[0]


@pytest.mark.parametrize("policy", SPARSE)
def test_budget_covering_everything_equals_dense(lm, ids, dense, policy):
    logits, _ = _run(lm, *_two_rows(ids), KVSpec(policy=policy, budget_tokens=PROMPT + STEPS))
    torch.testing.assert_close(logits, dense, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["swa", "h2o"])
def test_a_bf16_models_scores_and_full_budget_equal_its_dense_run(smollm2_loaded, ids, policy):
    """bf16 on the CPU: the native kernels read a bf16 cache and give fp32 probabilities, which the fp32
    score state takes; a budget covering everything still equals the bf16 model's dense run exactly."""
    cfg, weights, _ = smollm2_loaded
    lm16 = LM(cfg, {k: v.bfloat16() for k, v in weights.items()}, torch.device("cpu"), torch.bfloat16)
    dense16, _ = _run(lm16, *_two_rows(ids), KVSpec())
    logits, batch = _run(lm16, *_two_rows(ids), KVSpec(policy=policy, budget_tokens=PROMPT + STEPS))
    assert logits.dtype == torch.bfloat16 and batch.kv.scores[0].acc.dtype == torch.float32
    torch.testing.assert_close(logits, dense16, rtol=0, atol=0)
    sparse, _ = _run(lm16, *_two_rows(ids), KVSpec(policy=policy, sparsity=0.5))
    assert torch.isfinite(sparse).all() and (sparse[1:].float() - dense16[1:].float()).abs().max() > 1e-3


@pytest.mark.parametrize("policy", SPARSE)
def test_sparse_policy_changes_logits(lm, ids, dense, policy):
    logits, _ = _run(lm, *_two_rows(ids), KVSpec(policy=policy, sparsity=0.5))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], dense[0], rtol=0, atol=0)  # the prompt is attended densely
    assert (logits[1:] - dense[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("policy, budget", [("local", dict(budget_tokens=20)), ("streaming", dict(budget_tokens=20)),
                                            ("h2o", dict(budget_tokens=20)), ("h2o", dict(sparsity=0.8))])
def test_evict_equals_retain_where_dropped_tokens_never_return(lm, ids, policy, budget):
    # With a fixed budget, local and streaming never revisit a dropped slot; H2O's eviction is
    # permanent even in retain mode, ratio budget included. So freeing the KV changes nothing
    # but float summation order. (A growing ratio budget lets retain-mode local re-include a
    # token evict mode already freed, so that pair legitimately differs.)
    retain, _ = _run(lm, *_two_rows(ids), KVSpec(policy=policy, **budget))
    evict, _ = _run(lm, *_two_rows(ids), KVSpec(policy=policy, mode="evict", **budget))
    torch.testing.assert_close(evict, retain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", SPARSE)
def test_evict_memory_is_bounded_by_the_budget(lm, ids, policy):
    _, batch = _run(lm, *_two_rows(ids), KVSpec(policy=policy, sparsity=0.8, mode="evict"))
    length = PROMPT + STEPS
    budget = batch.kv.policy.budget(length)
    per_token = batch.kv.cache.bytes_per_token()
    assert budget == 24  # k = round(120 * 0.2 / 2) = 12, twice
    assert batch.kv.nbytes <= 1.1 * budget * per_token * 2  # two rows
    _, dense_batch = _run(lm, *_two_rows(ids), KVSpec())
    assert dense_batch.kv.nbytes == length * per_token * 2


def test_int8_kv_is_close_to_float_and_smaller(lm, ids):
    f32, b32 = _run(lm, *_two_rows(ids), KVSpec(policy="swa", sparsity=0.5))
    i8, b8 = _run(lm, *_two_rows(ids), KVSpec(policy="swa", sparsity=0.5, bits=8))
    assert b8.kv.cache.nbytes < 0.3 * b32.kv.cache.nbytes  # storage (the packed picks are float)
    assert (i8 - f32).abs().max() < 0.02 * f32.abs().max()


def test_padded_rows_stay_finite_and_fork_matches_a_fresh_batch(lm, ids):
    spec = KVSpec(policy="swa", sparsity=0.8)
    prompts, feed = [ids[:PROMPT], ids[:PROMPT - 30]], [ids[PROMPT:PROMPT + 8]] * 2
    logits, batch = _run(lm, prompts, feed, spec)
    assert torch.isfinite(logits).all()
    with torch.inference_mode():
        base = Batch(lm, prompts, 4, spec.settings())
        base.prefill()
        fork = base.select_rows(torch.tensor([1, 1]))  # the padded row, twice
        for t in ids[PROMPT:PROMPT + 4]:
            a, b = fork.decode(torch.tensor([t, t])), base.decode(torch.tensor([t, t]))
    torch.testing.assert_close(a, b[[1, 1]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["swa", "h2o"])
def test_packed_picks_match_a_fresh_gather_and_are_counted(lm, ids, policy):
    spec = KVSpec(policy=policy, sparsity=0.8)
    packed, batch = _run(lm, *_two_rows(ids), spec)
    store = batch.kv
    assert store.picks is not None and sum(p.copied for p in store.picks) > 0
    assert store.cache.nbytes < store.nbytes <= kv_bytes(lm.cfg, spec.settings(), 2, PROMPT + STEPS, torch.float32)
    per_step = dataclasses.replace(spec.settings(), pick_buffer=False)  # every step gathers all picks afresh
    fresh, batch = _run(lm, *_two_rows(ids), per_step)
    assert batch.kv.picks is None
    # Same selection; only the order the picks are summed in differs (float rounding).
    torch.testing.assert_close(packed, fresh, rtol=1e-4, atol=1e-4)
    # Without buffers the store holds the cache and, at most, one layer's gather.
    assert kv_bytes(lm.cfg, per_step, 2, PROMPT + STEPS, torch.float32) < kv_bytes(
        lm.cfg, spec.settings(), 2, PROMPT + STEPS, torch.float32)


# A bare store on random q/k: GQA, 4 query heads on 2 kv heads of 16 dims.
CFG = ModelConfig(name="tiny", arch=LLAMA_ARCH, vocab_size=100, hidden_size=64, intermediate_size=160,
                  num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=4096, norm_eps=1e-5,
                  tie_embeddings=False)


def _prefill(policy: str, valid: torch.Tensor, mask: torch.Tensor | None, seed: int = 0, **params) -> tuple[
        KVStore, torch.Tensor, torch.Tensor]:
    b, s = valid.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, s, 16, generator=gen) for heads in (4, 2, 2))
    store = KVStore(CFG, KVSettings(policy=get_policy(policy, **params)), valid, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        store.prefill(0, slice(None), q, k, v, mask)
    return store, q, k


@pytest.mark.parametrize("policy, params", [("swa", dict(budget_tokens=16, window=6)),
                                            ("swa", dict(budget_tokens=16, window=6, per_head=True)),
                                            ("h2o", dict(budget_tokens=16))])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_scores_are_the_weighted_prompt_attention(policy, params, padded):
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :9] = False
    mask = padded_mask(valid) if padded else None
    store, q, k = _prefill(policy, valid if padded else torch.ones_like(valid), mask, **params)
    state = store.scores[0]
    first, weights = state.prompt_weights(40, store.policy.score_window(40))
    assert first == (34 if policy == "swa" else 0)
    want = reference(q, k, first, mask, weights)  # (b, kvh, s)
    if store.groups == 1:
        want = want.sum(1, keepdim=True)
    got = state.prompt if policy == "swa" else state.acc[..., :40]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)


class _Outputs(TorchDispatchMode):
    """Every op's name, its output sizes and, for matmuls, its multiply-adds."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []  # (op, largest output numel, multiply-adds)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        numel = max((o.numel() for o in outs if isinstance(o, torch.Tensor)), default=0)
        macs = 0
        if func.__name__.split(".")[0] in ("bmm", "baddbmm", "mm", "addmm"):
            a, b_ = args[-2:] if func.__name__.startswith(("baddbmm", "addmm")) else args[:2]
            macs = a.numel() * b_.shape[-1]
        self.ops.append((func.__name__, numel, macs))
        return out


@pytest.mark.parametrize("score", ["window", "decay"])
def test_swa_prefill_scores_only_the_window_rows(score):
    # 2048 prompt tokens, window 64: every query row would be a (2048 x 2048) matrix per head,
    # 32 times the window's rows; what is built and multiplied must stay O(window * s).
    s, window, nh, d = 2048, 64, 4, 16
    with _Outputs() as seen:
        store, _, _ = _prefill("swa", torch.ones(1, s, dtype=torch.bool), None, budget_tokens=128, window=window,
                               score=score)
    rows = window * (4 if score == "decay" else 1)  # decay scores 4 windows (older weights < e^-4)
    scoring = [op for op in seen.ops if "scaled_dot_product" not in op[0]]  # the dense prefill itself
    assert max(numel for _, numel, _ in scoring) <= nh * rows * s
    macs = sum(m for _, _, m in scoring)
    assert nh * rows * (s - rows) * d <= macs <= nh * rows * s * (d + 1)  # QK^T of those rows, the weighted sum
    state = store.scores[0]
    weight = float(state.prompt_weights(s, window)[1].sum())
    assert state.current(s, window).sum().item() == pytest.approx(nh * weight, rel=1e-4)  # each row sums to 1
