"""Compute measurements for `runner.plan.calibrate`: GEMM, a memory-bound matrix-vector product, attention at
decode and prefill shapes, phase III recomputation, and the fixed costs of the real decode path.

Every function returns rows (`Row`: name, field, shape, seconds, value, unit); `field` is the profile
figure a row sets (`tflops.gpu_matmul`), "" for rows that only inform. Times are medians of `repeats`
runs after a warm-up, so one slow run on a shared machine does not move a figure.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from policies import get_policy
from runner.model import kernels, ops as M
from runner.model.config import LLAMA_ARCH, ModelConfig
from runner.kv.spec import KVSettings
from runner.model.layers import Attention, weight_shapes
from runner.engines.lm import LM, Batch
from runner.engines.sampling import SamplingParams, next_tokens

Row = dict[str, Any]
MIB = 2 ** 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` (device work included) over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, field: str, shape: str, seconds: float | None, value: float, unit: str) -> Row:
    # Four significant digits: run-to-run noise on a shared machine is larger than that.
    return {"name": name, "field": field, "shape": shape, "seconds": seconds,
            "value": float(f"{value:.4g}"), "unit": unit}


def _rand(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Uniform, not zeros or ones: some GPUs compress uniform memory contents, which would flatter bandwidth.
    return torch.rand(shape, device=device, dtype=dtype)


def matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int, field: str) -> list[Row]:
    """Square GEMM: the rate of prefill and big-batch projections."""
    a, b = _rand(n, n, device=device, dtype=dtype), _rand(n, n, device=device, dtype=dtype)
    out = torch.empty((n, n), device=device, dtype=dtype)
    s = median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats=repeats)
    return [row(f"matmul {device.type}", field, f"({n}x{n}) @ ({n}x{n}) {_name(dtype)}", s, 2 * n ** 3 / s / 1e12,
                "TFLOP/s")]


def projection(device: torch.device, dtype: torch.dtype, mib: int, repeats: int, field: str,
               packed: bool = False) -> list[Row]:
    """Decode-shaped projections (8 and 32 rows) by a weight far larger than the caches. Their time is
    about a fixed cost of reading the weight plus a per-row FLOP cost (on a CPU the same cores do
    both), so weight bytes / the fixed part is the streaming rate a decode step's weight reads get.
    (A single row takes a separate gemv path that streams ~2x faster here: not what batches see.)

    `packed`: through the all-resident path's own linear on a packed weight (`kernels.pack`). That
    kernel overlaps the read with the FLOPs (8 rows take about the weight's streaming time, 32 rows
    about their FLOPs at the GEMM rate), so the figure is weight bytes / the 8-row time, and the
    cost model takes the max of the two, not the sum.
    Otherwise F.linear on a plain weight: the executor's linears get each weight freshly staged and
    reordered on every call, and this is the figure its fidelity rows fit (`kernels.linear` on a
    resident plain weight measured ~2.7x higher and over-predicted them by up to 48%:
    results/bench/cost-model-fidelity, the rows of commit 627b8cf)."""
    cols = 4096
    rows = max(1, mib * MIB // (cols * dtype.itemsize))
    w = _rand(rows, cols, device=device, dtype=dtype)
    nbytes = w.numel() * w.element_size()
    if packed:
        w = kernels.pack(w)
    fn = kernels.linear if packed else F.linear
    t = {}
    for b in (8, 32):
        x = _rand(b, cols, device=device, dtype=dtype)
        t[b] = median_seconds(lambda: fn(x, w), device, repeats=repeats)
    per_row = max(0.0, (t[32] - t[8]) / 24)
    fixed = t[8] - 8 * per_row
    if packed or fixed < t[8] / 2:  # overlapped, or rows cost as much as the read: take the whole time
        fixed = t[8]
    what, part = ("packed weight", "8-row time") if packed else ("decode projection", "weight-read part")
    return [row(f"{what} {device.type}", field, f"(8 and 32 x{cols}) @ ({cols}x{rows}) {_name(dtype)}, "
                f"{nbytes // MIB} MiB: {t[8] * 1e3:.2f} / {t[32] * 1e3:.2f} ms, {part}", fixed,
                nbytes / fixed / 1e9, "GB/s")]


def attention(device: torch.device, dtype: torch.dtype, decode: tuple[tuple[int, int, int, int], ...],
              prefill: tuple[tuple[int, int, int, int], ...], repeats: int, field: str) -> list[Row]:
    """QK^T, softmax and PV through the runner's own kernels (`runner.model.ops`), shapes (batch, heads, len, d).

    The figure is the median over the decode shapes (one query against `len` cached keys), which is what
    generation spends its attention time on; prefill shapes are reported beside it. FLOPs count both
    products in full, 4 * b * heads * len * d per query (FlexGen's convention, no causal halving)."""
    rates, out = [], []
    for kind, shapes in (("decode", decode), ("prefill", prefill)):
        for b, nh, t, d in shapes:
            q = _rand(b, nh, 1 if kind == "decode" else t, d, device=device, dtype=dtype)
            k, v = _rand(b, nh, t, d, device=device, dtype=dtype), _rand(b, nh, t, d, device=device, dtype=dtype)
            fn = (lambda: M.attention_decode(q, k, v, None)) if kind == "decode" else \
                (lambda: M.attention_prefill(q, k, v, None))
            s = median_seconds(fn, device, repeats=repeats)
            rate = 4 * b * nh * t * d * q.shape[2] / s / 1e12
            rates += [rate] if kind == "decode" else []
            out.append(row(f"attention {kind} {device.type}", "", f"b={b} heads={nh} len={t} d={d} {_name(dtype)}",
                           s, rate, "TFLOP/s"))
    out.append(row(f"attention {device.type}", field, f"median of {len(rates)} decode shapes", None,
                   statistics.median(rates), "TFLOP/s"))
    return out


def recompute(device: torch.device, dtype: torch.dtype, hidden: int, stored: int, picks: int, repeats: int,
              field: str) -> list[Row]:
    """ALISA phase III: gather the kept layer inputs of `picks` scattered tokens and project them to K/V
    through the runner's own `Attention.project_kv` (norm, K/V rows of the QKV weight, rotary)."""
    cfg = ModelConfig(name="calibrate-recompute", arch=LLAMA_ARCH, vocab_size=256, hidden_size=hidden,
                      intermediate_size=hidden, num_layers=1, num_heads=hidden // 64, num_kv_heads=hidden // 64,
                      max_seq_len=stored, norm_eps=1e-5, tie_embeddings=False)
    unit = Attention(cfg, 0)
    w = {k: _rand(*s, device=device, dtype=dtype) for k, s in unit.weight_shapes().items()}
    rope = M.rope_tables(cfg.head_dim, stored, cfg.rope_theta, dtype, device)
    kept = _rand(stored, hidden, device=device, dtype=dtype)
    idx = torch.randperm(stored)[:picks].sort().values.to(device)
    s = median_seconds(lambda: unit.project_kv(w, rope, kept[idx], idx), device, repeats=repeats)
    flops = 2 * picks * hidden * 2 * cfg.kv_dim
    return [row(f"recompute {device.type}", field, f"{picks} of {stored} rows, hidden {hidden} {_name(dtype)}", s,
                flops / s / 1e12, "TFLOP/s")]


def _tiny_lm(layers: int, device: torch.device, dtype: torch.dtype) -> LM:
    """A LLaMA-family model with hidden 64 and a 256-token vocabulary: its compute is negligible, so a
    decode step's time is the fixed cost of the code path (launches, Python, bookkeeping)."""
    cfg = ModelConfig(name="calibrate-tiny", arch=LLAMA_ARCH, vocab_size=256, hidden_size=64,
                      intermediate_size=128, num_layers=layers, num_heads=4, num_kv_heads=2, max_seq_len=512,
                      norm_eps=1e-5, tie_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (1.0 if k.endswith("ln_w") else 0.0) + 0.1 * torch.randn(s, generator=gen)
               for k, s in weight_shapes(cfg).items()}
    return LM(cfg, {k: w.to(device=device, dtype=dtype) for k, w in weights.items()}, device, dtype)


def decode_step_seconds(lm: LM, kv: KVSettings | None, steps: int, prompt_len: int = 64) -> float:
    """Median time of one decode step as `runner.engines.base` runs it: forward, greedy pick, host sync."""
    params = SamplingParams(max_new_tokens=steps + 2)
    times = []
    with torch.inference_mode():
        batch = Batch(lm, [list(range(1, prompt_len + 1))], steps + 2, kv)
        tokens = next_tokens(batch.prefill(), params, None)
        for _ in range(steps + 1):
            start = time.perf_counter()
            tokens = next_tokens(batch.decode(tokens), params, None)
            tokens.tolist()  # the step loop's host sync (StopTracker reads the tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step warms up


def overheads(device: torch.device, dtype: torch.dtype, layers: int, steps: int, repeats: int) -> list[Row]:
    """Fixed costs from decode steps of tiny models: t(L layers) = step + L * layer, fitted from 1 and
    `layers` layers; `select` is the extra time per layer of SWA (80% sparsity: scores, top-k, pick
    buffer) over dense at `layers` layers. Interleaved repeats, medians: the differences are small."""
    one, many = _tiny_lm(1, device, dtype), _tiny_lm(layers, device, dtype)
    swa = KVSettings(policy=get_policy("swa", sparsity=0.8))
    runs: dict[str, list[float]] = {"dense 1": [], f"dense {layers}": [], f"swa {layers}": []}
    for _ in range(repeats):
        runs["dense 1"].append(decode_step_seconds(one, None, steps))
        runs[f"dense {layers}"].append(decode_step_seconds(many, None, steps))
        runs[f"swa {layers}"].append(decode_step_seconds(many, swa, steps))
    t1, tn, ts = (statistics.median(v) for v in runs.values())
    layer = max(0.0, (tn - t1) / (layers - 1))
    shape = f"tiny llama hidden 64, vocab 256, batch 1, prompt 64, {steps} steps x {repeats}"
    out = [row(f"decode step, {name} layers", "", shape, statistics.median(v), statistics.median(v) * 1e6, "us")
           for name, v in runs.items()]
    return out + [
        row("per-layer fixed cost", "overhead_us.layer", "(t_dense_L - t_dense_1) / (L - 1)", None, layer * 1e6, "us"),
        row("per-step fixed cost", "overhead_us.step", "t_dense_1 - layer", None, max(0.0, t1 - layer) * 1e6, "us"),
        row("sparse selection per layer", "overhead_us.select", "(t_swa_L - t_dense_L) / L", None,
            max(0.0, (ts - tn) / layers) * 1e6, "us")]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
