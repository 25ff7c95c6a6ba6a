"""Our OPT / LLaMA / Qwen2 math against HF transformers logits on real (tiny, random) checkpoint dirs.

Tolerance: fp32 end to end; the two implementations differ only in reduction order and
in fused vs separate projections, which moves logits by ~1e-6 relative. 1e-4 relative
(of the logit scale) leaves headroom while any real mistake (a wrong norm, rope layout,
mask or position) moves them by >1e-2.
"""
from __future__ import annotations

import pytest
import torch

from runner.engines.lm import LM, Batch
from runner.model.weights import load_model

KINDS = ["opt_preln", "opt_postln_proj", "llama_mha", "llama_gqa_tied", "qwen2"]


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _ours(path) -> LM:
    loaded = load_model(name=None, path=str(path), dtype=torch.float32, device="cpu")
    return LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_logits_match_hf(hf_checkpoints, kind):
    path = hf_checkpoints[kind]
    hf, lm = _hf(path), _ours(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, lm.cfg.vocab_size, (3, 12), generator=g)
    with torch.inference_mode():
        ref = hf(input_ids=ids).logits  # (b, s, v)
        batch = Batch(lm, ids[:, :7].tolist(), max_new_tokens=5)
        _close(batch.prefill(), ref[:, 6])
        for col in range(7, 12):  # feed the rest one token at a time through the KV cache
            _close(batch.decode(ids[:, col]), ref[:, col])


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_match_unpadded_hf(hf_checkpoints, kind):
    path = hf_checkpoints[kind]
    hf, lm = _hf(path), _ours(path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, lm.cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 6)]
    steps = torch.randint(3, lm.cfg.vocab_size, (3, 3), generator=g)
    with torch.inference_mode():
        batch = Batch(lm, prompts, max_new_tokens=3)
        ours = [batch.prefill()] + [batch.decode(steps[:, i]) for i in range(3)]
        for row, p in enumerate(prompts):
            full = torch.tensor([p + steps[row].tolist()])
            ref = hf(input_ids=full).logits[0]
            for i, logits in enumerate(ours):
                _close(logits[row], ref[len(p) - 1 + i])


def test_hf_checkpoint_fixture_is_not_trivial(hf_checkpoints):
    # Guards the oracle itself: distinct inputs must give distinct logits.
    hf = _hf(hf_checkpoints["llama_gqa_tied"])
    with torch.inference_mode():
        a = hf(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1]
        b = hf(input_ids=torch.tensor([[8, 9, 10]])).logits[0, -1]
    assert (a - b).abs().max() > 1e-3


def test_prefill_in_row_groups_equals_one_group(hf_checkpoints, monkeypatch):
    import runner.engines.lm as lm_mod
    lm = _ours(hf_checkpoints["llama_gqa_tied"])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, lm.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 8, 3, 8, 6)]
    with torch.inference_mode():
        whole = Batch(lm, prompts, 2)
        ref = [whole.prefill(), whole.decode(torch.tensor([4, 5, 6, 7, 8]))]
        monkeypatch.setattr(lm_mod, "PREFILL_GROUP_TOKENS", 16)  # 2 rows per group: 3 groups
        grouped = Batch(lm, prompts, 2)
        out = [grouped.prefill(), grouped.decode(torch.tensor([4, 5, 6, 7, 8]))]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(hf_checkpoints, dtype):
    # CUDA users get fp16 by default; on this CPU the half kernels are slow but must be right.
    # Tolerance: bf16 keeps 8 mantissa bits (~0.4% per rounding) over 2 layers of a tiny model.
    path = hf_checkpoints["llama_gqa_tied"]
    loaded = load_model(name=None, path=str(path), dtype=dtype, device="cpu")
    half = LM(loaded.config, loaded.weights, torch.device("cpu"), dtype)
    full = _ours(path)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with torch.inference_mode():
        a, b = Batch(half, prompts, 2), Batch(full, prompts, 2)
        for x, y in [(a.prefill(), b.prefill()), (a.decode(torch.tensor([3, 4])), b.decode(torch.tensor([3, 4])))]:
            assert x.dtype == dtype
            scale = y.abs().max().item()
            torch.testing.assert_close(x.float(), y, rtol=0, atol=0.05 * scale)


@pytest.mark.parametrize("kind", ["opt_postln_proj", "llama_gqa_tied"])
def test_packed_linears_give_the_unpacked_logits(hf_checkpoints, kind):
    # Packing (kernels.pack) changes the weights' layout, not the math: 2+ rows are bit-equal.
    from runner.model import kernels
    from runner.engines.lm import Pack
    loaded = load_model(name=None, path=str(hf_checkpoints[kind]), dtype=torch.float32, device="cpu")
    lms = {p: LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32, pack=p, screen=False)
           for p in Pack}
    head = {p: lm.unit_weights[-1]["lm_w"] for p, lm in lms.items()}
    if kernels._ONEDNN:
        assert lms[Pack.UNSHARED].unit_weights[1]["qkv_w"].is_mkldnn
        tied = loaded.config.tie_embeddings
        assert head[Pack.UNSHARED].is_mkldnn is (not tied)  # a tied head stays shared and plain
        assert head[Pack.ALL].is_mkldnn
    assert not any(t.is_mkldnn for t in lms[Pack.NONE].unit_weights[1].values())
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with torch.inference_mode():
        outs = {}
        for p, lm in lms.items():
            batch = Batch(lm, prompts, 2)
            outs[p] = [batch.prefill(), batch.decode(torch.tensor([3, 4]))]
    for p in (Pack.UNSHARED, Pack.ALL):
        for a, b in zip(outs[p], outs[Pack.NONE]):
            assert torch.equal(a, b)


def test_project_kv_reads_a_packed_qkv_weight(hf_checkpoints):
    # ALISA phase III recomputes K/V from a layer's inputs through the K/V rows of the QKV weight.
    from runner.engines.lm import Pack
    loaded = load_model(name=None, path=str(hf_checkpoints["llama_gqa_tied"]), dtype=torch.float32, device="cpu")
    packed = LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32, pack=Pack.UNSHARED)
    plain = LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32, pack=Pack.NONE)
    unit = packed.units[1]
    h, pos = torch.randn(4, loaded.config.hidden_size), torch.tensor([0, 3, 5, 9])
    got = unit.project_kv(packed.unit_weights[1], packed.rope, h, pos)
    ref = unit.project_kv(plain.unit_weights[1], plain.rope, h, pos)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_release_takes_exactly_the_packed_weights_out_of_the_callers_dict(hf_checkpoints):
    from runner.model import kernels
    loaded = load_model(name=None, path=str(hf_checkpoints["llama_gqa_tied"]), dtype=torch.float32, device="cpu")
    weights = dict(loaded.weights)
    lm = LM(loaded.config, weights, torch.device("cpu"), torch.float32, release=True)
    packed = {f"{u.prefix}.{k}" for u, w in zip(lm.units, lm.unit_weights) for k, t in w.items() if t.is_mkldnn}
    assert set(weights) == set(loaded.weights) - packed
    if kernels._ONEDNN:
        assert "layers.0.attn.qkv_w" in packed and "head.lm_w" in weights  # the tied head stays plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screen_copy_bytes_is_what_the_screen_adds(hf_checkpoints, dtype):
    # run_job's memory check counts the screen with screen_copy_bytes: it must be the bytes the LM holds
    # beyond its head, for a plain and a packed LM (a plain bf16 head is its own screen: no copy).
    from runner.engines.lm import Pack, screen_copy_bytes
    from runner.model import greedy_head
    loaded = load_model(name=None, path=str(hf_checkpoints["llama_gqa_tied"]), dtype=dtype, device="cpu")
    for pack in (Pack.NONE, Pack.UNSHARED):
        lm = LM(loaded.config, dict(loaded.weights), torch.device("cpu"), dtype, pack=pack, screen=True)
        head = lm.unit_weights[-1]
        screen, w = head[greedy_head.SCREEN], head["lm_w"]
        shared = not screen.is_mkldnn and screen.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        copy = 0 if shared else screen.numel() * 2  # bf16
        assert screen_copy_bytes(loaded.config, dtype, pack) == copy
    assert (dtype == torch.bfloat16) == (screen_copy_bytes(loaded.config, dtype, Pack.NONE) == 0)
