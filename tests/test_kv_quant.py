"""Group-wise min/max KV quantization: error bound, int4 packing, and QuantizedKVCache vs KVCache."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from runner.model.config import get_preset
from runner.kv.cache import KVCache
from runner.kv.quant import QTensor, QuantizedKVCache, QuantLayout, dequantize, flexgen_cache_layout, quantize

CFG = get_preset("smollm2-135m").replace(num_layers=2)  # kvh 3, head_dim 64
B, KVH, D = 3, CFG.num_kv_heads, CFG.head_dim


def expand_groups(t: Tensor, q: QTensor) -> Tensor:
    """Per-group scale/mn repeated to the element shape of q."""
    return t.repeat_interleave(q.group_size, dim=q.dim)


def assert_within_bound(x: Tensor, q: QTensor) -> None:
    err = (dequantize(q, x.dtype) - x).abs()
    scale = expand_groups(q.scale, q)
    # scale / 2 from rounding; the slack is a few ulps of the values for float arithmetic.
    slack = 4 * torch.finfo(x.dtype).eps * (x.abs() + scale)
    assert (err <= scale / 2 + slack).all(), (err - scale / 2).max()


def adversarial(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "constant":
        x = torch.full(shape, 0.37)
        x[..., 16:32] = -5.25  # (b, kvh, t, d): every 16-element group constant
    elif kind == "outliers":
        x[..., ::17] *= 1000.0  # a few huge channels stretch their groups' range
    elif kind == "tiny":
        x = x * 1e-30  # range so small the step underflows towards the guard
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["random", "constant", "outliers", "tiny"])
@pytest.mark.parametrize("dim", [3, 2])
def test_error_bound(bits: int, kind: str, dim: int) -> None:
    x = adversarial(kind, (2, 3, 32, 64), torch.Generator().manual_seed(bits + dim))
    q = quantize(x, bits, 16, dim)
    assert q.data.dtype == torch.uint8 and q.data.numel() == x.numel() * bits // 8
    assert q.scale.dtype == x.dtype and q.scale.shape[dim] == x.shape[dim] // 16
    assert_within_bound(x, q)
    if kind == "constant" and dim == 3:
        assert torch.equal(dequantize(q, x.dtype), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_span_full_range(bits: int) -> None:
    # Each group's min maps to code 0 and its max to the top code: the range is really used.
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(x, bits, 32, dim=1)
    deq = dequantize(q, x.dtype).view(4, 2, 32)
    xg = x.view(4, 2, 32)
    torch.testing.assert_close(deq.amin(-1), xg.amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(deq.amax(-1), xg.amax(-1), rtol=0, atol=1e-5)
    assert not torch.equal(deq, xg)  # lossy: values between min and max snap to codes


def test_fp16_storage_and_bound() -> None:
    x = torch.randn(2, 3, 8, 64, generator=torch.Generator().manual_seed(1)).half()
    q = quantize(x, 8, 64, dim=-1)
    assert q.dim == 3 and q.scale.dtype == q.mn.dtype == torch.float16
    assert_within_bound(x, q)


def test_int4_packing_round_trip() -> None:
    # Integers 0..15 with each group spanning 0..15: scale 1, min 0, so codes equal values.
    vals = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    x = torch.stack([vals, vals.flip(0)]).float()  # (2, 16)
    q = quantize(x, 4, 16, dim=1)
    assert q.data.shape == (2, 8)
    codes = x.to(torch.uint8)
    assert torch.equal(q.data, codes[:, 0::2] | (codes[:, 1::2] << 4))  # even slot -> low nibble
    assert torch.equal(dequantize(q, torch.float32), x)
    # Packing along a middle dim pairs neighbours along that dim only.
    y = x.t().contiguous().view(16, 2, 1)
    qy = quantize(y, 4, 16, dim=0)
    assert qy.data.shape == (8, 2, 1)
    assert torch.equal(dequantize(qy, torch.float32), y)


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="kv.group_size"):
        quantize(torch.zeros(2, 64), 8, 48, dim=1)
    with pytest.raises(ValueError, match="kv.group_size"):
        quantize(torch.zeros(2, 63), 4, 3, dim=1)  # odd group cannot be packed
    with pytest.raises(ValueError, match="kv.group_size"):
        QuantizedKVCache(CFG, 1, 8, torch.float32, "cpu", bits=8, group_size=48)
    with pytest.raises(ValueError, match="kv.bits"):
        QuantizedKVCache(CFG, 1, 8, torch.float32, "cpu", bits=3, group_size=32)


# -- QuantizedKVCache ------------------------------------------------------------------

def fill(cache, ref: KVCache, prompt: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """Prefill rows in two groups through rows() views, then decode `steps` single slots."""
    kvs = [torch.randn(B, KVH, prompt + steps, D, generator=gen) for _ in range(2 * CFG.num_layers)]
    for view_rows in (slice(0, 1), slice(1, B)):
        q_view, r_view = cache.rows(view_rows), ref.rows(view_rows)
        for layer in range(CFG.num_layers):
            k, v = kvs[2 * layer][view_rows, :, :prompt], kvs[2 * layer + 1][view_rows, :, :prompt]
            q_view.write(layer, k, v, 0)
            r_view.write(layer, k, v, 0)
    for t in range(prompt, prompt + steps):
        for layer in range(CFG.num_layers):
            k, v = kvs[2 * layer][:, :, t:t + 1], kvs[2 * layer + 1][:, :, t:t + 1]
            cache.write(layer, k, v, t)
            ref.write(layer, k, v, t)
    return kvs


def expected(x: Tensor, axis: str, bits: int, g: int) -> Tensor:
    """What the cache must return for slots x (b, kvh, t, d) written in order."""
    if axis == "hidden":
        return dequantize(quantize(x, bits, g, dim=3), x.dtype)
    full = x.shape[2] // g * g  # channel: complete slot groups quantized, the tail exact
    head = dequantize(quantize(x[:, :, :full], bits, g, dim=2), x.dtype)
    return torch.cat((head, x[:, :, full:]), dim=2)


def dense_copy(cache: QuantizedKVCache, end: int) -> KVCache:
    """A KVCache holding the quantized cache's dequantized slots: the gather/compact oracle."""
    ref = KVCache(CFG, B, cache.max_len, torch.float32, "cpu")
    for layer in range(CFG.num_layers):
        ref.write(layer, *cache.read(layer, end), 0)
    return ref


SETUPS = [("hidden", 8, 64), ("hidden", 4, 32), ("channel", 8, 8), ("channel", 4, 4)]


@pytest.mark.parametrize("axis,bits,g", SETUPS)
def test_read_matches_kvcache(axis: str, bits: int, g: int) -> None:
    # Capacity 21 is no multiple of g: the last partial group can only live in the residual.
    cache = QuantizedKVCache(CFG, B, 21, torch.float32, "cpu", bits=bits, group_size=g, axis=axis)
    ref = KVCache(CFG, B, 21, torch.float32, "cpu")
    prompt, steps = 13, 8  # the prompt ends mid group; decode completes groups
    kvs = fill(cache, ref, prompt, steps, torch.Generator().manual_seed(bits))
    end = prompt + steps
    for layer in range(CFG.num_layers):
        for got, want, x in zip(cache.read(layer, end), ref.read(layer, end), kvs[2 * layer:2 * layer + 2]):
            assert got.shape == (B, KVH, end, D) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected(x[:, :, :end], axis, bits, g), rtol=0, atol=1e-6)
            # Dense values within the quantization error (half a step of a ~N(0,1) group range).
            step = 9.0 / (2 ** bits - 1)
            assert (got - want).abs().max() <= step / 2
            assert not torch.equal(got, want)  # really quantized
    if axis == "channel":  # the trailing partial group is kept exactly
        tail = end // g * g
        assert torch.equal(cache.read(0, end)[0][:, :, tail:], ref.read(0, end)[0][:, :, tail:])


def index_kinds(end: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(5)
    shared = torch.tensor([end - 1, 0, 7, 12, 3])  # includes the newest slot and a residual one
    per_seq = torch.stack([torch.randperm(end, generator=gen)[:6] for _ in range(B)])[:, None]  # (b, 1, m)
    per_head = torch.stack([torch.stack([torch.randperm(end, generator=gen)[:6] for _ in range(KVH)])
                            for _ in range(B)])  # (b, kvh, m)
    return [shared, per_seq, per_head]


@pytest.mark.parametrize("axis,bits,g", SETUPS)
@pytest.mark.parametrize("which", [0, 1, 2])
def test_gather_matches_kvcache(axis: str, bits: int, g: int, which: int) -> None:
    cache = QuantizedKVCache(CFG, B, 24, torch.float32, "cpu", bits=bits, group_size=g, axis=axis)
    end = 19
    fill(cache, KVCache(CFG, B, 24, torch.float32, "cpu"), 15, end - 15, torch.Generator().manual_seed(7))
    oracle = dense_copy(cache, end)
    index = index_kinds(end)[which]
    for layer in range(CFG.num_layers):
        for got, want in zip(cache.gather(layer, index), oracle.gather(layer, index)):
            assert got.shape == want.shape == (B, KVH, index.shape[-1], D)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,g", [(8, 64), (4, 16)])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_compact_matches_kvcache(bits: int, g: int, which: int) -> None:
    cache = QuantizedKVCache(CFG, B, 24, torch.float32, "cpu", bits=bits, group_size=g)
    end = 19
    fill(cache, KVCache(CFG, B, 24, torch.float32, "cpu"), 15, end - 15, torch.Generator().manual_seed(8))
    oracle = dense_copy(cache, end)
    index = index_kinds(end)[which]
    m = index.shape[-1]
    for layer in range(CFG.num_layers):
        cache.compact(layer, index)
        oracle.compact(layer, index)
        for got, want in zip(cache.read(layer, m), oracle.read(layer, m)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The next decode lands after the kept slots, as with KVCache.
    k = torch.randn(B, KVH, 1, D, generator=torch.Generator().manual_seed(9))
    cache.write(0, k, k, m)
    torch.testing.assert_close(cache.read(0, m + 1)[0][:, :, m:], expected(k, "hidden", bits, g), rtol=0, atol=1e-6)


def test_channel_compact_raises() -> None:
    cache = QuantizedKVCache(CFG, B, 16, torch.float32, "cpu", bits=8, group_size=4, axis="channel")
    with pytest.raises(ValueError, match="kv.quant_axis: channel cannot be combined with kv.mode: evict"):
        cache.compact(0, torch.arange(2))


def test_rows_view_writes_land_in_parent() -> None:
    for axis, bits, g in SETUPS:
        cache = QuantizedKVCache(CFG, B, 8, torch.float32, "cpu", bits=bits, group_size=g, axis=axis)
        k = torch.randn(2, KVH, 8, D, generator=torch.Generator().manual_seed(3))
        view = cache.rows(slice(1, 3))
        view.write(1, k, -k, 0)
        assert view.nbytes * 3 == cache.nbytes * 2
        got_k, got_v = cache.read(1, 8)
        torch.testing.assert_close(got_k[1:], expected(k, axis, bits, g), rtol=0, atol=1e-6)
        torch.testing.assert_close(got_v[1:], expected(-k, axis, bits, g), rtol=0, atol=1e-6)


def test_channel_residual_and_overwrite() -> None:
    cache = QuantizedKVCache(CFG, 1, 16, torch.float32, "cpu", bits=8, group_size=4, axis="channel")
    x = torch.randn(1, KVH, 10, D, generator=torch.Generator().manual_seed(4))
    cache.write(0, x[:, :, :6], x[:, :, :6], 0)
    assert torch.equal(cache.read(0, 6)[0][:, :, 4:], x[:, :, 4:6])  # slots 4, 5 wait in the residual
    for t in range(6, 10):  # slot 7 completes group 4..8 from residual + new slots
        cache.write(0, x[:, :, t:t + 1], x[:, :, t:t + 1], t)
    torch.testing.assert_close(cache.read(0, 10)[0], expected(x, "channel", 8, 4), rtol=0, atol=1e-6)
    # Rewriting inside a quantized group re-forms the group from its dequantized earlier slots.
    y = torch.randn(1, KVH, 1, D, generator=torch.Generator().manual_seed(6))
    cache.write(0, y, y, 5)
    got = cache.read(0, 6)[0]
    step = (x[:, :, 4:6].amax(2) - x[:, :, 4:6].amin(2)).clamp_min(y.abs().amax()) * 2 / 255
    assert ((got[:, :, 4] - x[:, :, 4]).abs() <= step).all()
    assert torch.equal(got[:, :, 5:6], y)  # slot 5 now the residual tail
    with pytest.raises(IndexError):
        cache.read(0, 7)  # slots after a rewrite are dropped
    with pytest.raises(ValueError, match="contiguous"):
        cache.write(0, y, y, 8)


def test_overflow_raises() -> None:
    for axis in ("hidden", "channel"):
        cache = QuantizedKVCache(CFG, 1, 4, torch.float32, "cpu", bits=8, group_size=4, axis=axis)
        with pytest.raises(IndexError, match="overflow"):
            cache.write(0, torch.zeros(1, KVH, 5, D), torch.zeros(1, KVH, 5, D), 0)


@pytest.mark.parametrize("bits,want", [(8, (64 + 2 * 4) / (64 * 4)), (4, (32 + 2 * 4) / (64 * 4))])
def test_hidden_bytes_ratio(bits: int, want: float) -> None:
    cache = QuantizedKVCache(CFG, 2, 32, torch.float32, "cpu", bits=bits, group_size=64)
    dense = KVCache(CFG, 2, 32, torch.float32, "cpu")
    assert cache.nbytes / dense.nbytes == pytest.approx(want)  # 0.28125 and 0.15625
    assert cache.bytes_per_token() / dense.bytes_per_token() == pytest.approx(want)
    assert cache.bytes_per_token() * 2 * 32 == cache.nbytes


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_bytes_ratio(bits: int) -> None:
    g, max_len = 32, 500
    cache = QuantizedKVCache(CFG, 2, max_len, torch.float32, "cpu", bits=bits, group_size=g, axis="channel")
    dense = KVCache(CFG, 2, max_len, torch.float32, "cpu")
    # Per channel: codes and a scale and min per g slots for the 480 slots of whole groups,
    # plus the fp32 residual of g slots; relative to max_len fp32 slots.
    whole = max_len // g * g
    want = (whole * bits / 8 + whole // g * 2 * 4 + g * 4) / (max_len * 4)  # 0.365, 0.245
    assert cache.nbytes / dense.nbytes == pytest.approx(want)
    assert cache.bytes_per_token() / dense.bytes_per_token() == pytest.approx(want, rel=1e-2)


@pytest.mark.parametrize("bits,group,dim", [(8, 64, 3), (4, 64, 3), (4, 16, 2), (8, 8, 2), (4, 2, -1)])
def test_layout_states_what_quantize_stores(bits, group, dim):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float16)  # (b, kvh, n, d)
    q = quantize(x, bits, group, dim)
    layout = QuantLayout(bits=bits, group_size=group, dim=dim)
    assert layout.parts(tuple(x.shape), x.dtype) == [(tuple(t.shape), t.dtype) for t in (q.data, q.scale, q.mn)]
    assert layout.nbytes(tuple(x.shape), x.dtype) == q.nbytes
    assert layout.element_bytes(x.element_size()) * x.numel() == q.nbytes


def test_unquantized_layout_is_the_values():
    layout = QuantLayout(bits=16, group_size=64, dim=3)
    assert layout.parts((2, 3, 5, 64), torch.float32) == [((2, 3, 5, 64), torch.float32)]
    assert layout.nbytes((2, 3, 5, 64), torch.float32) == 2 * 3 * 5 * 64 * 4
    assert layout.element_bytes(4) == 4


@pytest.mark.parametrize("axis", ["hidden", "channel"])
@pytest.mark.parametrize("bits", [4, 8])
def test_cache_allocates_its_layout(axis, bits):
    cache = QuantizedKVCache(CFG, B, 96, torch.float32, "cpu", bits=bits, group_size=32, axis=axis)
    shape = (B, KVH, 96, D)  # (b, kvh, n, d); 96 slots are whole channel groups
    assert cache.nbytes == 2 * CFG.num_layers * (cache.layout.nbytes(shape, torch.float32)
                                                 + (0 if axis == "hidden" else B * KVH * 32 * D * 4))


def test_flexgen_cache_group_is_at_most_the_head_dim():
    assert flexgen_cache_layout(128).group_size == 64 and flexgen_cache_layout(32).group_size == 32
    assert flexgen_cache_layout(128).bits == 4
