"""Compute measurements for `runner.plan.calibrate`: GEMM, a memory-bound matrix-vector product, attention at
decode and prefill shapes, phase III recomputation, and the fixed costs of the real decode path.

Every function returns rows (`Row`: name, field, shape, seconds, value, unit, spread); `field` is the profile
figure a row sets (`tflops.gpu_matmul`), "" for rows that only inform. Times are medians of a `Timer`'s
repeats after a warm-up, so one slow run on a shared machine does not move a figure; `spread` is the slowest
repeat over the fastest, and a set of repeats spread beyond `MAX_SPREAD` is measured once more. Every repeat
first checks the calibration's `Deadline`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from policies import get_policy
from runner.model import kernels, ops as M
from runner.model.config import LLAMA_ARCH, ModelConfig
from runner.kv.quant import FLEXGEN_BITS, FLEXGEN_GROUP, QTensor, dequantize, quantize
from runner.kv.spec import KVSettings
from runner.model.layers import Attention, weight_shapes
from runner.engines.lm import LM, Batch
from runner.engines.sampling import SamplingParams, next_tokens

Row = dict[str, Any]
MIB = 2 ** 20
# Slowest repeat / fastest beyond which a measurement is unstable. On this 2-core machine, quiet, 15 quick
# calibrations in a row had every figure's repeats within 2.5x (most within 1.3x); with two busy
# processes beside it 14 of 15 spread 4x-19x: something else had the CPU for much of a repeat, and the
# median of such repeats is not this machine's rate.
MAX_SPREAD = 3.0
# A timed repeat calls the measured op (synced after each call) until it lasts this long. A repeat of one
# short call (tens of microseconds in `--quick`) is either untouched by the scheduler or preempted for a
# whole time slice (milliseconds) on a shared machine: 2x-15x spreads that say nothing about the op.
MIN_REPEAT_S = 0.02


class CalibrationError(Exception):
    """Calibration stopped (its deadline passed) or refused its figures; the message is one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deadline:
    """A wall-time bound on a whole calibration, started when made. Issue 20: a loaded machine once took
    882 s of wall time for 6 s of CPU, and its figures were 1,000-5,000x off."""
    limit_s: float
    wall_start: float = dataclasses.field(default_factory=time.perf_counter)
    cpu_start: float = dataclasses.field(default_factory=time.process_time)

    def check(self, what: str) -> None:
        """Raise `CalibrationError` naming `what` (the measurement running) once the limit has passed."""
        wall = time.perf_counter() - self.wall_start
        if wall <= self.limit_s:
            return
        # Process CPU time counts every thread: a busy process gets up to `threads` x its wall time. Far
        # less means it waited: other processes had the cores, or the disk was slow.
        cpu, threads = time.process_time() - self.cpu_start, torch.get_num_threads()
        share = cpu / wall / threads
        why = ("it waited for the CPU or the disk: re-run on a quiet machine" if share < 0.5 else
               "it was computing all along: raise the limit (--max-seconds)")
        raise CalibrationError(f"calibration stopped during {what}: {wall:.3g} s of wall time passed (limit "
                               f"{self.limit_s:g} s) for {cpu:.3g} s of process CPU time, {share:.0%} of "
                               f"{threads} torch thread(s) busy; {why}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    seconds: float  # median of the repeats
    spread: float  # slowest repeat / fastest


def spread(times: list[float]) -> float:
    return max(times) / min(times)


def settled(collect: Callable[[], dict[str, list[float]]]) -> dict[str, list[float]]:
    """`collect()`'s series of repeat times; collected once more if any spreads beyond MAX_SPREAD (one run
    preempted on a shared machine). The second set stands: if it spreads too, the figure is refused."""
    series = collect()
    if max(spread(v) for v in series.values()) > MAX_SPREAD:
        series = collect()
    return series


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timer:
    """How every measurement is timed: `repeats` runs after warm-ups, each checking `deadline` first."""
    repeats: int
    deadline: Deadline

    def __post_init__(self) -> None:
        if self.repeats < 2:  # a spread needs two runs
            raise ValueError(f"repeats: at least 2, got {self.repeats}")

    def time(self, fn: Callable[[], object], device: torch.device, what: str) -> Timing:
        """Wall time of one call of `fn`, device work included, after one warm-up call. Each repeat is the
        mean of as many calls as fill MIN_REPEAT_S (as the warm-up took)."""
        def once() -> float:
            start = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - start
        sync(device)
        self.deadline.check(what)
        calls = max(1, math.ceil(MIN_REPEAT_S / max(once(), 1e-6)))
        return self.series(lambda: sum(once() for _ in range(calls)) / calls, what, warmup=0)

    def series(self, sample: Callable[[], float], what: str, *, warmup: int = 1,
               repeats: int | None = None) -> Timing:
        """`sample()` returns one run's seconds: `repeats` of them (the timer's by default) after `warmup`."""
        def collect() -> dict[str, list[float]]:
            for _ in range(warmup):
                self.deadline.check(what)
                sample()
            times = []
            for _ in range(self.repeats if repeats is None else repeats):
                self.deadline.check(what)
                times.append(sample())
            return {what: times}
        times = settled(collect)[what]
        return Timing(seconds=statistics.median(times), spread=spread(times))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row(name: str, field: str, shape: str, seconds: float | None, value: float, unit: str, *,
        spread: float | None = None) -> Row:
    """`spread`: the slowest repeat / the fastest behind the figure (None: not timed, e.g. a capacity)."""
    # Four significant digits: run-to-run noise on a shared machine is larger than that.
    return {"name": name, "field": field, "shape": shape, "seconds": seconds,
            "value": float(f"{value:.4g}"), "unit": unit, "spread": None if spread is None else float(f"{spread:.3g}")}


def _rand(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Uniform, not zeros or ones: some GPUs compress uniform memory contents, which would flatter bandwidth.
    return torch.rand(shape, device=device, dtype=dtype)


def matmul(device: torch.device, dtype: torch.dtype, n: int, timer: Timer, field: str) -> list[Row]:
    """Square GEMM: the rate of prefill and big-batch projections."""
    a, b = _rand(n, n, device=device, dtype=dtype), _rand(n, n, device=device, dtype=dtype)
    out = torch.empty((n, n), device=device, dtype=dtype)
    name = f"matmul {device.type}"
    t = timer.time(lambda: torch.matmul(a, b, out=out), device, name)
    return [row(name, field, f"({n}x{n}) @ ({n}x{n}) {_name(dtype)}", t.seconds, 2 * n ** 3 / t.seconds / 1e12,
                "TFLOP/s", spread=t.spread)]


def projection(device: torch.device, dtype: torch.dtype, mib: int, timer: Timer, field: str,
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
    what, part = ("packed weight", "8-row time") if packed else ("decode projection", "weight-read part")
    timings = {}
    for b in (8, 32):
        x = _rand(b, cols, device=device, dtype=dtype)
        timings[b] = timer.time(lambda: fn(x, w), device, f"{what} {device.type}, {b} rows")
    t = {b: timing.seconds for b, timing in timings.items()}
    per_row = max(0.0, (t[32] - t[8]) / 24)
    fixed = t[8] - 8 * per_row
    if packed or fixed < t[8] / 2:  # overlapped, or rows cost as much as the read: take the whole time
        fixed = t[8]
    return [row(f"{what} {device.type}", field, f"(8 and 32 x{cols}) @ ({cols}x{rows}) {_name(dtype)}, "
                f"{nbytes // MIB} MiB: {t[8] * 1e3:.2f} / {t[32] * 1e3:.2f} ms, {part}", fixed,
                nbytes / fixed / 1e9, "GB/s", spread=max(timing.spread for timing in timings.values()))]


def attention(device: torch.device, dtype: torch.dtype, decode: tuple[tuple[int, int, int, int], ...],
              prefill: tuple[tuple[int, int, int, int], ...], timer: Timer, field: str) -> list[Row]:
    """QK^T, softmax and PV through the runner's own kernels (`runner.model.ops`), shapes (batch, heads, len, d).

    The figure is the median over the decode shapes (one query against `len` cached keys), which is what
    generation spends its attention time on; prefill shapes are reported beside it. FLOPs count both
    products in full, 4 * b * heads * len * d per query (FlexGen's convention, no causal halving).
    The figure's spread is the largest of its decode shapes'."""
    rates, spreads, out = [], [], []
    for kind, shapes in (("decode", decode), ("prefill", prefill)):
        for b, nh, t, d in shapes:
            q = _rand(b, nh, 1 if kind == "decode" else t, d, device=device, dtype=dtype)
            k, v = _rand(b, nh, t, d, device=device, dtype=dtype), _rand(b, nh, t, d, device=device, dtype=dtype)
            fn = (lambda: M.attention_decode(q, k, v, None)) if kind == "decode" else \
                (lambda: M.attention_prefill(q, k, v, None))
            name, shape = f"attention {kind} {device.type}", f"b={b} heads={nh} len={t} d={d} {_name(dtype)}"
            timing = timer.time(fn, device, f"{name} {shape}")
            rate = 4 * b * nh * t * d * q.shape[2] / timing.seconds / 1e12
            if kind == "decode":
                rates.append(rate)
                spreads.append(timing.spread)
            out.append(row(name, "", shape, timing.seconds, rate, "TFLOP/s", spread=timing.spread))
    out.append(row(f"attention {device.type}", field, f"median of {len(rates)} decode shapes", None,
                   statistics.median(rates), "TFLOP/s", spread=max(spreads)))
    return out


def recompute(device: torch.device, dtype: torch.dtype, hidden: int, stored: int, picks: int, timer: Timer,
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
    name = f"recompute {device.type}"
    t = timer.time(lambda: unit.project_kv(w, rope, kept[idx], idx), device, name)
    flops = 2 * picks * hidden * 2 * cfg.kv_dim
    return [row(name, field, f"{picks} of {stored} rows, hidden {hidden} {_name(dtype)}", t.seconds,
                flops / t.seconds / 1e12, "TFLOP/s", spread=t.spread)]


def quantization(device: torch.device, dtype: torch.dtype, mib: int, timer: Timer) -> list[Row]:
    """Nanoseconds per element of the runner's own group-wise quantization (`runner.kv.quant`), on a
    `mib` MiB compute-dtype tensor: KV as the caches store it (groups of 64 along the head dim, the
    `kv.group_size` default and FlexGen's compress_cache) at 4 and 8 bits, quantize and dequantize;
    weights as compress_weight stores them (FlexGen's 4 bits, groups of 64 along dim 0), dequantize
    only (weights are quantized once, at load). Dequantize writes into a reused buffer, as decode does."""
    head_dim = 128
    n = max(FLEXGEN_GROUP, mib * MIB // dtype.itemsize // head_dim // FLEXGEN_GROUP * FLEXGEN_GROUP)
    kv = _rand(n, head_dim, device=device, dtype=dtype)  # rows: (batch, head, token) flattened
    weight = _rand(n, head_dim, device=device, dtype=dtype)
    cases: list[tuple[str, Callable[[], object]]] = []
    for bits in (FLEXGEN_BITS, 8):
        q = quantize(kv, bits, FLEXGEN_GROUP, dim=1)
        cases += [(f"quant_ns.kv_quantize_{bits}", lambda b=bits: quantize(kv, b, FLEXGEN_GROUP, dim=1)),
                  (f"quant_ns.kv_dequantize_{bits}", lambda q=q: dequantize(q, dtype, out=kv))]
    wq: QTensor = quantize(weight, FLEXGEN_BITS, FLEXGEN_GROUP, dim=0)
    cases.append((f"quant_ns.weight_dequantize_{FLEXGEN_BITS}", lambda: dequantize(wq, dtype, out=weight)))
    rows = []
    for field, fn in cases:
        name = f"{field.split('.')[1].replace('_', ' ')} {device.type}"
        t = timer.time(fn, device, name)
        rows.append(row(name, field, f"({n}x{head_dim}) {_name(dtype)}, groups of {FLEXGEN_GROUP}", t.seconds,
                        t.seconds / kv.numel() * 1e9, "ns/element", spread=t.spread))
    return rows


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


def decode_step_seconds(lm: LM, kv: KVSettings | None, steps: int, deadline: Deadline, prompt_len: int = 64) -> float:
    """Median time of one decode step as `runner.engines.base` runs it: forward, greedy pick, host sync."""
    what = f"decode steps of a tiny {lm.cfg.num_layers}-layer model"
    params = SamplingParams(max_new_tokens=steps + 2)
    times = []
    with torch.inference_mode():
        batch = Batch(lm, [list(range(1, prompt_len + 1))], steps + 2, kv)
        tokens = next_tokens(batch.prefill(), params, None)
        for _ in range(steps + 1):
            deadline.check(what)
            start = time.perf_counter()
            tokens = next_tokens(batch.decode(tokens), params, None)
            tokens.tolist()  # the step loop's host sync (StopTracker reads the tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first step warms up


def overheads(device: torch.device, dtype: torch.dtype, layers: int, steps: int, timer: Timer) -> list[Row]:
    """Fixed costs from decode steps of tiny models: t(L layers) = step + L * layer, fitted from 1 and
    `layers` layers; `select` is the extra time per layer of SWA (80% sparsity: scores, top-k, pick
    buffer) over dense at `layers` layers. Interleaved repeats, medians: the differences are small.
    Each fitted figure's spread is the largest of the three runs' (a difference is no steadier than its terms)."""
    one, many = _tiny_lm(1, device, dtype), _tiny_lm(layers, device, dtype)
    swa = KVSettings(policy=get_policy("swa", sparsity=0.8))

    def collect() -> dict[str, list[float]]:
        runs: dict[str, list[float]] = {"dense 1": [], f"dense {layers}": [], f"swa {layers}": []}
        for _ in range(timer.repeats):
            runs["dense 1"].append(decode_step_seconds(one, None, steps, timer.deadline))
            runs[f"dense {layers}"].append(decode_step_seconds(many, None, steps, timer.deadline))
            runs[f"swa {layers}"].append(decode_step_seconds(many, swa, steps, timer.deadline))
        return runs
    runs = settled(collect)
    t1, tn, ts = (statistics.median(v) for v in runs.values())
    layer = max(0.0, (tn - t1) / (layers - 1))
    shape = f"tiny llama hidden 64, vocab 256, batch 1, prompt 64, {steps} steps x {timer.repeats}"
    out = [row(f"decode step, {name} layers", "", shape, statistics.median(v), statistics.median(v) * 1e6, "us",
               spread=spread(v)) for name, v in runs.items()]
    worst = max(spread(v) for v in runs.values())
    return out + [
        row("per-layer fixed cost", "overhead_us.layer", "(t_dense_L - t_dense_1) / (L - 1)", None, layer * 1e6, "us",
            spread=worst),
        row("per-step fixed cost", "overhead_us.step", "t_dense_1 - layer", None, max(0.0, t1 - layer) * 1e6, "us",
            spread=worst),
        row("sparse selection per layer", "overhead_us.select", "(t_swa_L - t_dense_L) / L", None,
            max(0.0, (ts - tn) / layers) * 1e6, "us", spread=worst)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
