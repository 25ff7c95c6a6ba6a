"""int8 linear weights (runner/model/int8.py, kernels.linear_int8, model.weight_bits: 8): the
quantization's error bound, the product against the dequantized weight's, and a SmolLM2 LM with int8
layer linears against the fp32 one."""
from __future__ import annotations

import pytest
import torch

from runner.engines.lm import LM, Batch
from runner.model import int8, kernels
from runner.model.int8 import Int8Weight


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of unequal range


def test_round_trip_error_is_at_most_half_a_step_per_element():
    w = _weight(300, 576)
    w[7] = 0  # an all-zero row: scale 1, no NaN
    qw = int8.quantize(w)
    assert qw.q.dtype == torch.int8 and qw.scale.dtype == torch.bfloat16
    assert int(qw.q.abs().max()) == int8.QMAX and int(qw.q.min()) >= -int8.QMAX
    err = (w - int8.dequantize(qw)).abs()
    half_step = qw.scale.float()[:, None] / 2
    assert bool((err <= half_step * (1 + 1e-6)).all())  # fp32 rounding of the subtraction only
    assert float(qw.scale[7]) == 1.0 and not bool(qw.q[7].any())
    # Each row's largest element maps to +-127 (within the bf16 scale's 2^-8): the range is used.
    assert bool((qw.q[torch.arange(300) != 7].abs().amax(dim=1) >= 126).all())


def test_bf16_dequantize_is_the_fp32_product_rounded_once():
    # dequantize's bf16 shortcut (int8 prefill's weight, each call) against the definition, bit for bit,
    # scales from tiny to huge included.
    w = _weight(300, 576)
    w[3] *= 1e-30
    w[4] *= 1e30
    qw = int8.quantize(w)
    ref = (qw.q.float() * qw.scale.float()[:, None]).to(torch.bfloat16)
    got = int8.dequantize(qw, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # linear_int8 rounds x to bf16, possibly the dequantized weight to bf16 (many rows), and the output to
    # bf16: each at most 2^-8 relative (bf16's unit roundoff), so |out - x @ W.T| <= 2 * 2^-8 * (|x| @ |W|.T)
    # + 2^-8 |x @ W.T| <= 3 * 2^-8 * (|x| @ |W|.T), plus fp32 summation (far smaller).
    return 3 * 2.0 ** -8 * (x.abs().float() @ w.abs().T) + 1e-5


@pytest.mark.parametrize("shape", [(1, 576), (8, 1, 576), (64, 576), (65, 576), (2, 150, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_int8_equals_the_dequantized_product(shape, dtype):
    qw = int8.quantize(_weight(960, 576, seed=1))
    w = int8.dequantize(qw)
    b = torch.randn(960).to(dtype).float()  # the bias as the model holds it
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = kernels.linear(x, qw, b.to(dtype))
    assert out.shape == (*shape[:-1], 960) and out.dtype == dtype
    ref = x.float() @ w.T + b
    bound = _bound(x, w) + (2.0 ** -8 * ref.abs() if dtype == torch.bfloat16 else 0)  # the bias add's rounding
    assert bool(((out.float() - ref).abs() <= bound).all())
    # The bound is tight enough to catch a wrong weight: the unquantized float product is well outside it.
    assert not bool(((x.float() @ _weight(960, 576, seed=3).T + b - ref).abs() <= bound).all())


def test_linear_int8_off_the_kernels_shapes_falls_back():
    qw = int8.quantize(_weight(17, 70))  # 70 is no multiple of 16: torch's kernel is not used
    x = torch.randn(3, 70)
    torch.testing.assert_close(kernels.linear(x, qw), x @ int8.dequantize(qw).T, rtol=1e-5, atol=1e-5)


def test_weight_rows_slices_q_and_scale():
    qw = int8.quantize(_weight(40, 32))
    part = kernels.weight_rows(qw, slice(10, None))
    assert isinstance(part, Int8Weight)
    assert torch.equal(int8.dequantize(part), int8.dequantize(qw)[10:])


def test_smollm2_int8_logits_are_close_to_fp32(smollm2_loaded, smollm2_lm, one_torch_thread):
    cfg, weights, _ = smollm2_loaded
    lm8 = LM(cfg, dict(weights), torch.device("cpu"), torch.float32, weight_bits=8)
    assert isinstance(lm8.unit_weights[1]["qkv_w"], Int8Weight)
    assert not isinstance(lm8.unit_weights[-1]["lm_w"], Int8Weight)  # the head stays fp32
    prompts = [list(range(100, 132)), list(range(300, 340))]
    logits = {}
    for name, lm in (("fp32", smollm2_lm), ("int8", lm8)):
        batch = Batch(lm, prompts, 2)
        first = batch.prefill()  # 2 x 40 rows: the dequantizing path
        logits[name] = (first, batch.decode(first.argmax(-1)))  # 2 rows: torch's int8 kernel
    # Each quantized weight is off by a relative rms r = sqrt(mean (w - q s)^2 / mean w^2) (s/sqrt(12)
    # per element against the rows' rms; 1.2% for the worst SmolLM2 weight). A linear's output inherits
    # about r, and the residual stream and norms keep the 120 linears' errors from compounding: measured
    # 0.8% (prefill) and 1.9% (decode) on the logits. 3r catches a missing scale or a transposed weight
    # (errors of order 100%); int8 must differ from fp32 at all.
    r = max(_relative_rms(weights[k], int8.dequantize(int8.quantize(weights[k])))
            for k in weights if k.endswith(("qkv_w", "o_w", "gate_up_w", "down_w")))
    for ref, got in zip(logits["fp32"], logits["int8"]):
        assert 0 < _relative_rms(ref, got) < 3 * r
        assert torch.equal(ref.argmax(-1), got.argmax(-1))


def _relative_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def test_q8_0_layer_linears_load_as_stored(tiny_llama_ggufs):
    """model.weight_bits: 8 reads a GGUF's Q8_0 layer linears as their int8 values and block scales: no
    float round trip, and exactly what the file dequantizes to."""
    from runner.model.gguf import read_gguf_lazy
    path = tiny_llama_ggufs["gqa_tied_q8"]
    _, floats, _ = read_gguf_lazy(path, torch.float32)
    _, stored, _ = read_gguf_lazy(path, torch.float32, int8_linears=True)
    for name in stored:
        w = stored[name]
        if name.startswith("layers.") and name.endswith(("qkv_w", "o_w", "gate_up_w", "down_w")):
            assert isinstance(w, Int8Weight) and w.scale.shape == (w.q.shape[0], w.q.shape[1] // int8.GROUP)
            assert torch.equal(int8.dequantize(w), floats[name])  # q/k rows un-permuted with their scales
        else:
            assert not isinstance(w, Int8Weight) and torch.equal(w, floats[name])  # norms, embedding, head


def test_q8_0_lm_equals_the_dequantized_fp32_lm(tiny_llama_ggufs, one_torch_thread):
    """The same weights, as int8 with block scales or dequantized to fp32: the products are exact either
    way (8-bit values times fp16-sized scales), so only the summation order may differ."""
    from runner.model.weights import load_model
    path = str(tiny_llama_ggufs["gqa_tied_q8"])
    q8 = load_model(name=None, path=path, dtype=torch.float32, weight_bits=8)
    f32 = load_model(name=None, path=path, dtype=torch.float32)
    lm8 = LM(q8.config, dict(q8.weights), torch.device("cpu"), torch.float32, weight_bits=8)
    lm32 = LM(f32.config, dict(f32.weights), torch.device("cpu"), torch.float32)
    assert lm8.unit_weights[1]["qkv_w"].scale.dim() == 2  # as stored, not re-quantized per row
    prompts = [list(range(10, 30)), list(range(40, 52))]
    out = []
    for lm in (lm8, lm32):
        batch = Batch(lm, prompts, 2)
        first = batch.prefill()  # 40 rows and 2: the native group-wise kernel where it is built
        out.append((first, batch.decode(first.argmax(-1))))
    for got, ref in zip(*out):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_group_wise_int8_product_is_exact_products_summed_in_fp32(xdtype):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    scale = torch.rand(40, 96 // int8.GROUP, generator=g).half().float()  # fp16 scales, as Q8_0 stores
    w = Int8Weight(q, scale)
    x = torch.randn(3, 96, generator=g).to(xdtype)
    ref = x.double() @ int8.dequantize(w).double().T
    mag = x.abs().double() @ int8.dequantize(w).abs().double().T
    rounding = 2.0 ** -8 * ref.abs() * (1 + 2.0 ** -7) if xdtype == torch.bfloat16 else 0
    out = kernels.linear(x, w)
    assert bool(((out.double() - ref).abs() <= rounding + 98 * 2.0 ** -24 * mag).all())
    torch.testing.assert_close(kernels.linear(x, w, residual=out), 2 * out, rtol=2 ** -7, atol=1e-5)
