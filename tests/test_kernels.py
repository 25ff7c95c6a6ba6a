"""The oneDNN linear must compute what F.linear computes, for wide and narrow weights; the native
decode attention what float64 matmuls compute, and the same whatever parts the cache comes in."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runner.model import kernels, native
@pytest.mark.parametrize("shape, out_features, bias", [((1, 576), 49152, False), ((8, 1, 576), 960, True),
                                                      ((2, 37, 64), 320, True), ((3, 16), 16, False),
                                                      ((32, 1, 1536), 576, False)])
def test_linear_matches_f_linear(shape, out_features, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g) * 0.05
    b = torch.randn(out_features, generator=g) if bias else None
    ref = F.linear(x, w, b)
    out = kernels.linear(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_linear_takes_non_contiguous_rows_and_other_dtypes():
    x = torch.randn(4, 6, 32)[:, -1]  # (4, 32) view with a row stride of 6*32, like the LM head input
    w = torch.randn(100, 32)
    torch.testing.assert_close(kernels.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert kernels.linear(xb, wb).dtype == torch.bfloat16
    torch.testing.assert_close(kernels.linear(xb, wb), F.linear(xb, wb))


needs_onednn = pytest.mark.skipif(not kernels._ONEDNN, reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33, 300])
def test_packed_weight_gives_the_plain_weights_result(rows):
    # Same kernel, same values, a layout chosen once: bit-equal from 2 rows up. At 1 row oneDNN may
    # take another summation order (seen 2.4e-6 on outputs ~1), so that case gets fp32 rounding room.
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 576, generator=g), torch.randn(960, 576, generator=g) * 0.05, torch.randn(960)
    packed = kernels.pack(w)
    assert packed.is_mkldnn and not w.is_mkldnn
    ref, out = kernels.linear(x, w, b), kernels.linear(x, packed, b)
    if rows > 1:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    x3 = x.view(1, rows, 576)  # (b, s, in) as the units call it
    assert torch.equal(kernels.linear(x3, packed, b)[0], out)


@needs_onednn
def test_plain_undoes_pack_and_pack_leaves_what_it_cannot_pack():
    w = torch.randn(64, 32)
    assert torch.equal(kernels.plain(kernels.pack(w)), w)
    assert kernels.plain(w) is w
    for other in (w.half(), torch.randn(8)):  # not fp32 or bf16, not a matrix
        assert kernels.pack(other) is other
    wb = w.bfloat16()  # packed only where the CPU has native bf16 dot products
    assert (kernels.pack(wb) is wb) != kernels.native_bf16()
    assert torch.equal(kernels.plain(kernels.pack(wb)), wb)
    packed = kernels.pack(w)
    assert kernels.pack(packed) is packed


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bf16_weight_gives_the_plain_bf16_result(rows):
    # The greedy head's screen (runner/model/greedy_head.py) multiplies through a packed bf16 copy; its
    # bound assumes the plain bf16 product's math (fp32 sums of exact bf16 products, bf16 out).
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g).bfloat16(), (torch.randn(700, 576, generator=g) * 0.05).bfloat16()
    packed = kernels.pack_bf16(w)
    assert packed.is_mkldnn and kernels.pack_bf16(torch.randn(4, 4)).dtype == torch.float32
    out, ref = kernels.linear(x, packed), x.double() @ w.double().t()
    assert out.dtype == torch.bfloat16
    assert bool(((out.double() - ref).abs() <= 2.0 ** -7 * ref.abs() + 1e-5).all())


needs_native = pytest.mark.skipif(not native.status().available, reason=native.status().reason)


# ---- rms norm -----------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("shape", [(64, 1, 576), (3, 7, 64), (2, 600, 576), (5, 17), (0, 576)])
def test_native_rms_norm_matches_float64(shape):
    """Decode rows, odd widths (no 16-lane multiple) and a prefill big enough to split over threads.
    fp32 against a float64 reference: a few ulps of the output's scale."""
    x, w = torch.randn(*shape) * 3, torch.randn(shape[-1])
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    out = kernels.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * scale)
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-5, atol=1e-5)


@needs_native
def test_native_rms_norm_rows_do_not_depend_on_the_batch_or_threads():
    x, w = torch.randn(300, 576), torch.randn(576)
    whole = kernels.rms_norm(x, w, 1e-6)  # over PARALLEL_MIN elements: split over threads
    for rows in (slice(0, 1), slice(7, 9), slice(250, 300)):
        assert torch.equal(kernels.rms_norm(x[rows], w, 1e-6), whole[rows])
    strided = x.t().contiguous().t()  # same values, not contiguous: copied, same result
    assert torch.equal(kernels.rms_norm(strided, w, 1e-6), whole)


@needs_native
@pytest.mark.parametrize("shape", [(16, 1, 576), (2, 600, 576), (5, 17)])
def test_native_bf16_rms_norm_is_the_fp32_norm_rounded_once(shape):
    """A bf16 model's norm: widened, normed in fp32, rounded once (as F.rms_norm does in bf16). The
    fp32 sum of squares may round differently from torch's, which can move a result by one bf16 ulp."""
    x, w = (torch.randn(*shape) * 3).bfloat16(), torch.randn(shape[-1]).bfloat16()
    out = kernels.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    ref = F.rms_norm(x.float(), (shape[-1],), w.float(), 1e-5)
    ulp = ref.abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 ulp at most (8 significant bits)
    assert ((out.float() - ref).abs() <= ulp).all()
    assert (out == ref.bfloat16()).float().mean() > 0.99  # almost always the very same rounding
    nan = x.clone()
    nan[0, ..., 0] = float("nan")
    assert kernels.rms_norm(nan, w, 1e-5)[0].isnan().all()  # a NaN row stays NaN, as in torch


def test_rms_norm_falls_back_to_torch_off_fp32_cpu():
    x, w = torch.randn(4, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))
    xg = torch.randn(4, 64, requires_grad=True)
    assert kernels.rms_norm(xg, w.float(), 1e-5).requires_grad  # autograd: torch's kernel


# ---- decode attention ---------------------------------------------------------------------------


def _cache_views(b, kvh, t, d, seed, capacity_extra=7):
    """K or V as the cache holds them: views of the first t slots of a longer buffer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, kvh, t + capacity_extra, d, generator=g)[:, :, :t]


def _reference(qg, ks, vs, probs):
    scale = 1.0 / math.sqrt(qg.shape[-1])
    scores = torch.cat([qg.double() @ k.double().transpose(-1, -2) for k in ks], dim=-1) * scale
    values = probs.double() @ torch.cat([v.double() for v in vs], dim=2)
    return scores, values


@needs_native
@pytest.mark.parametrize("b, kvh, g, d, sizes", [
    (32, 3, 3, 64, [544]),  # SmolLM2 at decode
    (2, 3, 3, 64, [5, 0, 37]),  # picks + an empty part + a recent run; tails shorter than 16
    (1, 1, 1, 16, [1]),
    (3, 2, 12, 128, [40, 9]),  # more query heads per kv head than one values pass takes (8)
    (2, 4, 2, 256, [16, 31]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_matches_float64(b, kvh, g, d, sizes, dtype):
    """A bf16 cache (and bf16 queries) is widened exactly, so the same fp32 bounds hold against the
    float64 math on the bf16 values; scores, probabilities and outputs are fp32 either way."""
    qg = torch.randn(b, kvh, g, d).to(dtype)
    ks = [_cache_views(b, kvh, t, d, seed=i).to(dtype) for i, t in enumerate(sizes)]
    vs = [_cache_views(b, kvh, t, d, seed=10 + i).to(dtype) for i, t in enumerate(sizes)]
    probs = torch.softmax(torch.randn(b, kvh, g, sum(sizes)), dim=-1)
    assert kernels._native_for(qg, ks) is not None and kernels._native_for(probs, vs) is not None
    ref_scores, ref_values = _reference(qg, ks, vs, probs)
    scores, values = kernels.decode_scores(qg, ks, 1.0 / math.sqrt(d)), kernels.decode_values(probs, vs)
    # fp32 sums of d (scores) or t (values) products: a few ulps of the magnitudes summed.
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=1e-5 * math.sqrt(d))
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=1e-6 * max(sizes))
    assert scores.dtype == values.dtype == torch.float32


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_does_not_depend_on_how_the_cache_is_split(dtype):
    # A sparse selection attends over picks + the recent run; scoring and summing them natively
    # must give what the whole run gives, bit for bit, so full-budget policies equal dense.
    b, kvh, g, d, t = 4, 3, 3, 64, 70
    qg, k, v = torch.randn(b, kvh, g, d), _cache_views(b, kvh, t, d, 1), _cache_views(b, kvh, t, d, 2)
    k, v = k.to(dtype), v.to(dtype)
    probs = torch.softmax(torch.randn(b, kvh, g, t), dim=-1)
    whole_s, whole_v = kernels.decode_scores(qg, [k], 0.125), kernels.decode_values(probs, [v])
    for cut in (1, 16, 33, 69):
        parts_k, parts_v = [k[:, :, :cut], k[:, :, cut:]], [v[:, :, :cut], v[:, :, cut:]]
        assert torch.equal(kernels.decode_scores(qg, parts_k, 0.125), whole_s)
        assert torch.equal(kernels.decode_values(probs, parts_v), whole_v)
    shuffled = torch.randperm(t)
    assert torch.equal(kernels.decode_scores(qg, [k[:, :, shuffled]], 0.125), whole_s[..., shuffled])


def test_the_csv_names_the_decode_attention_kernel_that_runs():
    # The throughput CSV's decode_attention column: native for fp32 and bf16 caches on a CPU with the
    # library, torch for fp16, other head dims and GPUs (and everywhere without a compiler).
    cpu, native_on = torch.device("cpu"), native.status().available
    for dtype in (torch.float32, torch.bfloat16):
        assert kernels.decode_attention_kernel(64, cpu, dtype) == ("native" if native_on else "torch")
    assert kernels.decode_attention_kernel(64, cpu, torch.float16) == "torch"
    assert kernels.decode_attention_kernel(40, cpu, torch.float32) == "torch"
    assert kernels.decode_attention_kernel(64, torch.device("cuda"), torch.float32) == "torch"


def test_decode_attention_falls_back_to_matmul_where_native_does_not_apply():
    qg = torch.randn(2, 1, 4, 40)  # head dim 40: not a multiple of 16
    k, v = torch.randn(2, 1, 9, 40), torch.randn(2, 1, 9, 40)
    probs = torch.softmax(torch.randn(2, 1, 4, 9), dim=-1)
    assert kernels._native_for(qg, [k]) is None
    assert torch.equal(kernels.decode_scores(qg, [k], 0.5), (qg @ k.transpose(-1, -2)) * 0.5)
    assert torch.equal(kernels.decode_values(probs, [v]), probs @ v)
    for other in (k.double(), k.transpose(-1, -2).contiguous().transpose(-1, -2), k.requires_grad_()):
        assert kernels._native_for(qg, [other]) is None  # not fp32 / rows not contiguous / autograd
    k64 = torch.randn(2, 1, 9, 64)
    assert kernels._native_for(qg[..., :16].repeat(1, 1, 1, 4), [k64, k64.bfloat16()]) is None  # mixed parts


def _status_in_subprocess(tmp_path, **env) -> str:
    code = "from runner.model import native; s = native.status(); print(s.available, s.reason)"
    full_env = {**os.environ, "ALISA_NATIVE_CACHE": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_native_status_says_why_it_is_off(tmp_path):
    assert _status_in_subprocess(tmp_path, ALISA_NATIVE="0") == "False turned off by ALISA_NATIVE=0"
    assert _status_in_subprocess(tmp_path, CC="no-such-compiler") == "False no C compiler (no-such-compiler) on PATH"
    failed = _status_in_subprocess(tmp_path, CC="false")  # a "compiler" that always fails
    assert failed.startswith("False ") and "failed on decode_attention.c" in failed
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler here")
def test_native_kernels_build_wherever_there_is_a_compiler(tmp_path):
    # A fresh cache: this builds from source, as a user's first run does.
    assert _status_in_subprocess(tmp_path).startswith("True built by")
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_rotate_half_in_float64(dtype):
    from runner.model import ops
    b, nh, kvh, s, d = 2, 9, 3, 5, 64
    cos_t, sin_t = ops.rope_tables(d, 64, 10000.0, dtype)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 40, 41]])
    cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)  # (b, 1, s, d)
    qkv = torch.randn(b, s, (nh + 2 * kvh) * d).to(dtype)
    x = ops.split_heads(qkv[..., :(nh + kvh) * d], nh + kvh)  # a strided view, as Attention.forward makes
    out = ops.apply_rope(x, cos, sin)
    x64, c64, s64 = x.double(), cos.double(), sin.double()
    half = torch.cat([-x64[..., d // 2:], x64[..., :d // 2]], dim=-1)  # HF's rotate_half
    plain_sin = s64 * torch.cat([-torch.ones(d // 2), torch.ones(d // 2)]).double()  # the table's first half is negated
    ref = x64 * c64 + half * plain_sin
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6  # one bf16 rounding (of |ref| <= 2 |x|)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(((out.double() - ref).abs() <= tol * (x64.abs().amax() + 1)).all())
    torch.testing.assert_close(out, torch.addcmul(x * cos, x.roll(d // 2, dims=-1), sin),
                               **({} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 2 ** -7}))


def test_rope_of_a_row_does_not_depend_on_its_batch():
    from runner.model import ops
    cos_t, sin_t = ops.rope_tables(64, 256, 10000.0, torch.float32)
    qkv = torch.randn(3, 1, 15 * 64, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([[100], [70], [3]])
    cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)
    together = ops.apply_rope(ops.split_heads(qkv[..., :12 * 64], 12), cos, sin)
    for r in range(3):  # each row alone, and in another slot of the batch: bit for bit the same
        rows = [r, r]
        alone = ops.apply_rope(ops.split_heads(qkv[rows][..., :12 * 64], 12), cos[rows], sin[rows])
        assert torch.equal(alone[0], together[r]) and torch.equal(alone[1], together[r])
