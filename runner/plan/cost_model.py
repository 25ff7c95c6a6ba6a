"""Cost model: predicted time, throughput and peak memory of a plan on a hardware profile, without
loading a weight.

FlexGen's model (paper §4.3): a unit's time is the max of its compute and of each transfer stream
(gpu<-cpu, cpu<-gpu, disk read, disk write, cpu compute) when copies overlap compute, their sum when
they do not; a step is the sum over units. Decode is summed step by step as the sequence grows, so
ALISA's phase in force changes during a run: the KV policy sets how many tokens each step attends
(sparsity), the KV bits the bytes per token, the token placement which tokens are on cpu and which
are recomputed (runner/offload/token_kv.py). Compute follows a roofline per op: max(FLOPs / FLOP/s, bytes /
memory bandwidth), plus the profile's fixed costs per layer, step, selection and copy. Peak memory
per tier comes from the executor's own planning (runner/offload/sizing.py).

All functions are pure: a `Workload`, a `Plan` and a `HardwareProfile` in, a `Prediction` out.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from runner.model.config import ModelConfig
from runner.plan.hardware import HardwareProfile
from runner.plan.quant_cost import kv_load_s, kv_store_s, weight_dequantize_s
from runner.kv.quant import FLEXGEN_BITS, QuantLayout, flexgen_cache_layout
from runner.kv.spec import KVMode, KVSettings
from runner.kv.store import kv_bytes
from runner.offload.phases import TokenPhases
from runner.offload.sequence_kv import split_rows
from runner.model.layers import MLP, Attention, Embedding, Head, matrix_params, num_params
from runner.memory.tiers import Tier
from runner.offload.scheduled import plan_bytes
from runner.offload.policy import KVPlacement, OffloadPolicy
from runner.offload.sizing import plan_need

# SWA keeps its picks packed on the gpu (runner/kv/picks.py) and fetches only picks new to it: about
# this share of the global picks per step and layer (measured: alisa-vs-flexgen-bytes, SmolLM2 at
# 80% sparsity, 37.0 MB fetched over 32 rows x 511 steps x 30 layers = 0.17 INT8 tokens per row,
# layer and step, of ~38 global picks with 80% of them on cpu).
PICK_CHURN = 0.006
STREAMS = ("compute", "gpu<-cpu", "cpu<-gpu", "disk read", "disk write", "cpu compute")


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What is generated: the model, equal-length prompts, and the KV policy and storage."""
    cfg: ModelConfig
    prompt_len: int
    gen_len: int
    num_prompts: int
    dtype: torch.dtype
    kv: KVSettings = dataclasses.field(default_factory=KVSettings)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How it runs: the batch shape and the executor's offload policy (None: the plain engine)."""
    gpu_batch_size: int
    num_gpu_batches: int = 1
    offload: OffloadPolicy | None = None


@dataclass(frozen=True, kw_only=True)
class Prediction:
    prefill_s: float  # all blocks
    decode_s: float
    prefill_throughput: float  # prompt tokens / s
    decode_throughput: float  # FlexGen's: prompts * (gen_len - 1) / decode_s
    total_throughput: float  # generated tokens / (prefill_s + decode_s)
    peak_bytes: dict[Tier, int]  # per tier (empty from a quick prediction)
    phase_s: tuple[float, float, float]  # decode time in ALISA's phases I, II, III
    bound: str  # the stream that sets most of the decode time (STREAMS)


# ---------------------------------------------------------------- compute

def gemm_tflops(hw: HardwareProfile, e: int) -> float:
    """Large-GEMM rate for `e`-byte operands: on a CPU, 2-byte operands are bf16 (native only where
    `gpu_matmul_bf16` was measured); an accelerator's profile is measured in its run dtype already."""
    bf16 = hw.tflops.gpu_matmul_bf16
    return bf16 if not hw.accelerator and e == 2 and bf16 else hw.tflops.gpu_matmul


def _mm_s(hw: HardwareProfile, params: float, rows: float, e: int, packed: bool = False) -> float:
    """A matmul of `rows` rows by a (params)-element weight on the compute device. On an accelerator
    FLOP- or weight-read bound (the roofline); on a CPU the same cores read and multiply, and skinny
    decode GEMMs measure as the sum of the two (runner/plan/measure.py::projection). `packed`:
    the weight is held in oneDNN's layout (`kernels.pack`, the all-resident CPU path); with a
    profile's `bandwidth_gbps.packed_weights` that kernel streams at that rate and overlaps the
    FLOPs (the max, as on an accelerator)."""
    bw = hw.bandwidth_gbps
    compute = 2 * params * rows / (gemm_tflops(hw, e) * 1e12)
    if packed and bw.packed_weights > 0:
        return max(compute, params * e / (bw.packed_weights * 1e9))
    read = params * e / (bw.gpu_memory * 1e9)
    return max(compute, read) if hw.accelerator else compute + read


def _kv_elem_bytes(kv: KVSettings, e: int) -> float:
    """Stored bytes per K or V element under the job's kv.bits: codes plus a scale and a minimum per group."""
    return QuantLayout(bits=kv.bits, group_size=kv.group_size, dim=-1).element_bytes(e)


@dataclass(frozen=True)
class _Shape:
    """Per-unit constants of one workload and plan."""
    b: int  # rows per GPU batch
    k: int  # GPU batches per block
    e: int  # bytes per element of the compute dtype
    attn_params: int
    mlp_params: int
    head_params: int
    off_bytes: dict[str, dict[Tier, int]]  # per unit kind: weight bytes in each home tier
    staged: dict[str, int]  # per unit kind: elements staged from off the gpu (compressed ones included)
    copies: dict[str, int]  # per unit kind: tensors loaded per step
    packed: frozenset[str]  # unit kinds whose matrices the plain path holds packed (runner.engines.lm.Pack.UNSHARED)


def _shape(w: Workload, plan: Plan) -> _Shape:
    return _shape_of(w.cfg, w.dtype, plan)


@functools.lru_cache(maxsize=1 << 14)  # the plan search predicts many plans of one workload
def _shape_of(cfg: ModelConfig, dtype: torch.dtype, plan: Plan) -> _Shape:
    # Every layer has the same shapes: layer 0's units stand for all of them.
    units = {"attn": Attention(cfg, 0), "mlp": MLP(cfg, 0), "embed": Embedding(cfg), "head": Head(cfg)}
    policy = plan.offload or OffloadPolicy()
    off, staged, copies = {}, {}, {}
    for kind, u in units.items():
        shapes = u.weight_shapes()
        off[kind], staged[kind] = plan_bytes(shapes, policy, dtype)
        copies[kind] = len(shapes) if off[kind][Tier.GPU] < sum(off[kind].values()) else 0
    return _Shape(b=plan.gpu_batch_size, k=plan.num_gpu_batches if plan.offload else 1, e=dtype.itemsize,
                  attn_params=matrix_params(units["attn"].weight_shapes()),
                  mlp_params=matrix_params(units["mlp"].weight_shapes()),
                  head_params=matrix_params(units["head"].weight_shapes()), off_bytes=off, staged=staged,
                  copies=copies, packed=frozenset() if plan.offload is not None else
                  frozenset({"attn", "mlp"} | (set() if cfg.tie_embeddings else {"head"})))


# ---------------------------------------------------------------- streams per unit

def _zero(n: int) -> dict[str, np.ndarray]:
    return {s: np.zeros(n) for s in STREAMS}


def _weights(hw: HardwareProfile, sh: _Shape, kind: str, streams: dict[str, np.ndarray]) -> None:
    """A unit's weights from their home tiers, once per step for the whole block."""
    bw, tiers = hw.bandwidth_gbps, sh.off_bytes[kind]
    up = tiers[Tier.CPU] + tiers[Tier.DISK]
    latency = sh.copies[kind] * hw.overhead_us.transfer * 1e-6
    streams["gpu<-cpu"] += up / (bw.gpu_from_cpu * 1e9) + (latency if up else 0.0)
    streams["disk read"] += tiers[Tier.DISK] / (bw.cpu_from_disk * 1e9)


def _activations(hw: HardwareProfile, w: Workload, sh: _Shape, policy: OffloadPolicy, tokens: int,
                 streams: dict[str, np.ndarray]) -> None:
    """Hidden states off the gpu: each (unit, GPU batch) takes its input up and sends its output home."""
    tier = policy.act_tier
    if tier is Tier.GPU:
        return
    nbytes = sh.k * sh.b * tokens * w.cfg.hidden_size * sh.e
    bw = hw.bandwidth_gbps
    streams["gpu<-cpu"] += nbytes / (bw.gpu_from_cpu * 1e9)
    streams["cpu<-gpu"] += nbytes / (bw.cpu_from_gpu * 1e9)
    if tier is Tier.DISK:
        streams["disk read"] += nbytes / (bw.cpu_from_disk * 1e9)
        streams["disk write"] += nbytes / (bw.disk_from_cpu * 1e9)


def _attended(kv: KVSettings, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attended, recent, other) token counts per length under the KV policy."""
    split = np.array([kv.policy.split(int(n)) for n in lengths], dtype=float).reshape(-1, 2)
    recent, other = split[:, 0], split[:, 1]
    full = recent + other >= lengths
    return np.where(full, lengths, recent + other), np.where(full, lengths, recent), np.where(full, 0, other)


def _sequence_kv(hw: HardwareProfile, w: Workload, sh: _Shape, policy: OffloadPolicy, lengths: np.ndarray,
                 streams: dict[str, np.ndarray], new: int) -> None:
    """FlexGen's per-sequence split: cpu/disk rows' whole KV loaded per layer and GPU batch (or, with
    cpu_cache_compute, the cpu rows attended there), `new` tokens per row written home."""
    c, bw = w.cfg, hw.bandwidth_gbps
    if policy.cache_gpu_percent >= 100 and not policy.compress_cache:
        return
    g, cpu, disk = split_rows(sh.b, policy.cache_gpu_percent, policy.cache_cpu_percent)
    if w.kv.mode is KVMode.EVICT:  # only the kept slots are stored, loaded and (the prompt's) written home
        lengths = np.minimum(lengths, [w.kv.policy.budget(int(n)) + 1 for n in lengths])
        new = w.kv.policy.budget(new) if new > 1 else new
    tok = 2 * c.kv_dim * (flexgen_cache_layout(c.head_dim).element_bytes(sh.e) if policy.compress_cache else sh.e)
    loaded = disk + (0 if policy.cpu_cache_compute else cpu)
    k = sh.k
    if new == 1:  # decode: read the prefix
        streams["gpu<-cpu"] += k * loaded * lengths * tok / (bw.gpu_from_cpu * 1e9)
        streams["disk read"] += k * disk * lengths * tok / (bw.cpu_from_disk * 1e9)
        if policy.compress_cache:  # every row's stored prefix is dequantized into the working slot
            streams["compute"] += kv_load_s(hw, FLEXGEN_BITS, k * sh.b * lengths * 2 * c.kv_dim)
        else:  # gpu rows are copied into the working slot too (FlexGen's general_copy)
            streams["compute"] += k * 2 * g * lengths * tok / (bw.gpu_memory * 1e9)
        if policy.cpu_cache_compute and cpu:
            kv_read = cpu * lengths * 2 * c.kv_dim * sh.e / (bw.cpu_memory * 1e9)
            flops = 4 * cpu * c.num_heads * lengths * c.head_dim / (hw.tflops.cpu_attention * 1e12)
            streams["cpu compute"] += k * np.maximum(kv_read, flops)
    if policy.compress_cache:
        streams["compute"] += kv_store_s(hw, FLEXGEN_BITS, k * sh.b * new * 2 * c.kv_dim, read_back=True)
    streams["cpu<-gpu"] += k * (cpu + disk) * new * tok / (bw.cpu_from_gpu * 1e9)
    streams["disk write"] += k * disk * new * tok / (bw.disk_from_cpu * 1e9)


def _token_kv(hw: HardwareProfile, w: Workload, sh: _Shape, policy: OffloadPolicy, lengths: np.ndarray,
              streams: dict[str, np.ndarray], decode: bool) -> None:
    """ALISA's token placement: tokens leaving the gpu window go to cpu; old tokens the policy attends
    come up, fetched ahead of the layer (only picks new to SWA's packed buffer, or every cpu-resident
    pick each step without one, and the recent run's part below the gpu window), recomputed ones from
    kept activations."""
    c, bw, kv = w.cfg, hw.bandwidth_gbps, w.kv
    ph = TokenPhases.of(policy)
    tok = 2 * c.kv_dim * _kv_elem_bytes(kv, sh.e)
    lo = ph.gpu_from_each(lengths)
    before = ph.gpu_from_each(lengths - 1) if decode else np.zeros_like(lo)
    rec = ph.recompute_below_each(lengths)
    # Tokens leaving the gpu window for cpu, quantized first; those phase III deletes as they leave are dropped.
    leaving = sh.k * sh.b * np.maximum(lo - np.maximum(before, rec), 0)
    streams["cpu<-gpu"] += leaving * tok / (bw.cpu_from_gpu * 1e9)
    if kv.bits != 16:
        streams["compute"] += kv_store_s(hw, kv.bits, leaving * 2 * c.kv_dim, read_back=False)
    if not decode:
        return
    att, recent, other = _attended(kv, lengths)
    if kv.policy.scoring is not None:  # picks new to the buffer (all of them without one), over the older tokens
        span = np.maximum(lengths - recent, 1)
        picks = (PICK_CHURN if policy.pick_buffer else 1.0) * other / span
        # The recent run is read where the gpu window holds it; a shorter window leaves its oldest on cpu.
        spill = np.clip(lo - (lengths - recent), 0, recent)
        fetched = sh.k * sh.b * (picks * (np.minimum(lo, lengths - recent) - rec) + spill)
        recomputed = sh.k * sh.b * picks * rec
        reread = sh.k * sh.b * spill if policy.pick_buffer else fetched  # fetched again every step
    else:  # every attended token older than the gpu window, every step
        old = np.clip(att - (lengths - lo), 0, lo) / np.maximum(lo, 1)
        fetched, recomputed = sh.k * sh.b * old * (lo - rec), sh.k * sh.b * old * rec
        reread = fetched
    copies = 2 if kv.bits == 16 else 6  # K and V; quantized, each as codes, scales and minimums
    fetch = fetched * tok / (bw.gpu_from_cpu * 1e9) + np.where(fetched > 0, copies * sh.k * hw.overhead_us.transfer
                                                              * 1e-6, 0.0)
    # Tokens read every step are selected and fetched ahead of their layer (runner/offload/token_kv.py
    # fetch_ahead, from the executor's load_cache), so their link time overlaps compute like every
    # other load; quantized ones are dequantized again every step.
    streams["gpu<-cpu"] += fetch
    if kv.bits != 16:
        streams["compute"] += kv_load_s(hw, kv.bits, reread * 2 * c.kv_dim)
    flops = recomputed * 2 * c.hidden_size * 2 * c.kv_dim
    streams["compute"] += flops / (hw.tflops.gpu_recompute * 1e12) + recomputed * c.hidden_size * sh.e / (
        bw.gpu_memory * 1e9)


def _attention_compute(hw: HardwareProfile, w: Workload, sh: _Shape, plan: Plan, lengths: np.ndarray,
                       decode: bool) -> np.ndarray:
    """One attention unit over the block: projections, attention, selection and fixed costs."""
    c, bw, tf, kv = w.cfg, hw.bandwidth_gbps, hw.tflops, w.kv
    tokens = 1 if decode else w.prompt_len
    proj = _mm_s(hw, sh.attn_params, sh.b * tokens, sh.e, "attn" in sh.packed)
    if not decode:  # SDPA over the prompt: a big batched matmul
        attn = 4 * sh.b * c.num_heads * lengths * lengths * c.head_dim / (gemm_tflops(hw, sh.e) * 1e12)
        return sh.k * (proj + attn + hw.overhead_us.layer * 1e-6)
    att, _, other = _attended(kv, lengths)
    token = plan.offload is not None and plan.offload.kv_placement is KVPlacement.TOKEN
    packed = kv.policy.scoring is not None or token  # attention reads compute-dtype copies
    e_read = sh.e if kv.bits == 16 or packed else _kv_elem_bytes(kv, sh.e) + 2 * sh.e
    read = sh.b * att * 2 * c.kv_dim * e_read / (bw.gpu_memory * 1e9)
    flops = 4 * sh.b * c.num_heads * att * c.head_dim / (tf.gpu_attention * 1e12)
    t = proj + np.maximum(read, flops) + hw.overhead_us.layer * 1e-6
    if kv.policy.scoring is not None:  # scores kept over every token, top-k over the older ones
        scored = np.where(other > 0, 1.0, 0.0)
        t = t + scored * (3 * sh.b * lengths * 4 / (bw.gpu_memory * 1e9) + hw.overhead_us.select * 1e-6)
    return sh.k * t


def _shared_cpu(hw: HardwareProfile, st: dict[str, np.ndarray], n: int) -> None:
    """When the "gpu" is the CPU, cpu-side attention runs on the compute cores, and every gpu<->cpu
    copy is a memcpy through the memory the compute streams from: both add to compute. (The link
    streams stay: an emulated slow link still holds each copy for bytes / its bandwidth.)"""
    bw = hw.bandwidth_gbps
    copied = st["gpu<-cpu"] * bw.gpu_from_cpu + st["cpu<-gpu"] * bw.cpu_from_gpu  # GB (latency terms included)
    st["compute"] = st["compute"] + st["cpu compute"] + copied / bw.cpu_memory
    st["cpu compute"] = np.zeros(n)


def _unit_time(streams: dict[str, np.ndarray], overlap: bool) -> np.ndarray:
    return functools.reduce(np.maximum if overlap else np.add, (streams[s] for s in STREAMS))


def _step(hw: HardwareProfile, w: Workload, sh: _Shape, plan: Plan, lengths: np.ndarray,
          decode: bool, streams: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Time of one forward of the block at each length (decode steps, or the prefill at its length),
    and (with `streams`) the time of each stream summed over units (for the bound)."""
    policy = plan.offload or OffloadPolicy()
    overlap = policy.overlap
    n, tokens = len(lengths), 1 if decode else w.prompt_len
    totals = _zero(n)
    total = np.zeros(n)
    compress = (policy.compress_weight and plan.offload is not None)
    for kind, count in (("attn", w.cfg.num_layers), ("mlp", w.cfg.num_layers), ("embed", 1), ("head", 1)):
        st = _zero(n)
        if plan.offload is not None:
            _weights(hw, sh, kind, st)
            _activations(hw, w, sh, policy, tokens, st)
        if compress:  # dequantize the staged codes on the gpu
            st["compute"] += weight_dequantize_s(hw, sh.staged[kind])
        if kind == "attn":
            st["compute"] += _attention_compute(hw, w, sh, plan, lengths, decode)
            if plan.offload is not None and policy.kv_placement is KVPlacement.TOKEN:
                _token_kv(hw, w, sh, policy, lengths, st, decode)
            elif plan.offload is not None:
                _sequence_kv(hw, w, sh, policy, lengths, st, 1 if decode else w.prompt_len)
        elif kind == "mlp":
            st["compute"] += sh.k * _mm_s(hw, sh.mlp_params, sh.b * tokens, sh.e, "mlp" in sh.packed)
        elif kind == "head":  # logits of the last position only, and the step's fixed cost
            st["compute"] += sh.k * (_mm_s(hw, sh.head_params, sh.b, sh.e, "head" in sh.packed)
                                     + hw.overhead_us.step * 1e-6)
        if not hw.accelerator:
            _shared_cpu(hw, st, n)
        total += count * _unit_time(st, overlap)
        for s in STREAMS if streams else ():
            totals[s] += count * st[s]
    return total, totals


# ---------------------------------------------------------------- prediction

def peak_bytes(w: Workload, plan: Plan) -> dict[Tier, int]:
    """Bytes per tier at the run's peak: the executor's own plan, or the plain engine's weights, KV and
    hidden states."""
    if plan.offload is not None:
        need = plan_need(w.cfg, plan.offload, w.kv, w.dtype, gpu_batch_size=plan.gpu_batch_size,
                         num_gpu_batches=plan.num_gpu_batches, prompt_len=w.prompt_len, gen_len=w.gen_len)
        return {t: int(n) for t, n in need.items()}
    c, e, b = w.cfg, w.dtype.itemsize, plan.gpu_batch_size
    weights = num_params(c) * e
    kv = kv_bytes(c, w.kv, b, w.prompt_len + w.gen_len, w.dtype)
    acts = b * w.prompt_len * max(c.hidden_size, c.embed_dim) * e + b * c.vocab_size * e
    return {Tier.GPU: int(weights + kv + acts), Tier.CPU: 0, Tier.DISK: 0}


def _decode_lengths(w: Workload, plan: Plan, samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sequence lengths of the decode steps and how many steps each stands for: every step, or
    `samples` evenly spaced ones (the search's quick estimate), plus the phase switch steps on their
    own (the switch to phase II moves a burst of old tokens at once). Read-only arrays."""
    policy = plan.offload
    token = policy is not None and policy.kv_placement is KVPlacement.TOKEN
    return _lengths(w.prompt_len, w.gen_len, samples, (policy.p1, policy.p2) if token else ())


@functools.lru_cache(maxsize=1 << 12)  # the plan search asks for the same few sample sets
def _lengths(prompt_len: int, gen_len: int, samples: int | None, switches: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.arange(prompt_len + 1, prompt_len + gen_len, dtype=float)
    if samples is None or len(lengths) <= samples:
        out = lengths, np.ones(len(lengths))
    else:
        edges = set(np.linspace(0, len(lengths), samples + 1).round().astype(int).tolist())
        for switch in switches:
            i = switch - prompt_len - 1
            if 0 <= i < len(lengths):
                edges |= {i, i + 1}
        cuts = np.array(sorted(edges))
        mids = (cuts[:-1] + cuts[1:]) // 2
        out = lengths[mids], np.diff(cuts).astype(float)
    for a in out:
        a.setflags(write=False)  # shared between calls
    return out


def predict(w: Workload, plan: Plan, hw: HardwareProfile, *, samples: int | None = None,
            quick: bool = False) -> Prediction:
    """Predicted prefill, decode and total throughput and peak memory of `plan` for `w` on `hw`;
    `samples`: estimate decode from that many evenly spaced steps instead of every step; `quick`:
    the throughputs only, no peak memory, phase split or bound (the plan search's inner loop)."""
    sh = _shape(w, plan)
    prefill, _ = _step(hw, w, sh, plan, np.array([w.prompt_len], dtype=float), decode=False, streams=False)
    lengths, weight = _decode_lengths(w, plan, samples)
    decode, streams = _step(hw, w, sh, plan, lengths, decode=True, streams=not quick)
    decode = decode * weight
    blocks = math.ceil(w.num_prompts / (sh.b * sh.k))
    prefill_s, decode_s = blocks * float(prefill[0]), blocks * float(decode.sum())
    phase_s, bound = (0.0, 0.0, 0.0), ""
    if not quick:
        phase = np.ones(len(lengths), dtype=int)
        if plan.offload is not None and plan.offload.kv_placement is KVPlacement.TOKEN:
            phase = TokenPhases.of(plan.offload).phase_each(lengths)
        phase_s = tuple(blocks * float(decode[phase == p].sum()) for p in (1, 2, 3))
        bound = max(STREAMS, key=lambda s: float((streams[s] * weight).sum()))
    n = w.num_prompts
    return Prediction(prefill_s=prefill_s, decode_s=decode_s,
                      prefill_throughput=n * w.prompt_len / prefill_s if prefill_s else 0.0,
                      decode_throughput=n * (w.gen_len - 1) / decode_s if decode_s else 0.0,
                      total_throughput=n * w.gen_len / (prefill_s + decode_s),
                      peak_bytes={} if quick else peak_bytes(w, plan), phase_s=phase_s, bound=bound)
