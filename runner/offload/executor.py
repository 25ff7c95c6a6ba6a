"""Block-scheduled executor: FlexGen's zig-zag schedule over (token i, layer j, GPU batch k).

A block is up to `num_gpu_batches` GPU batches of `gpu_batch_size` prompts. For each new token the loop
walks the layers; each layer's weights are loaded once and reused by every GPU batch of the block
(FlexGen's point: weight I/O amortised over the block), and while layer j computes, layer j+1's weights
are prefetched into the other gpu staging slot by the copy engine. `overlap: false` runs the identical
order with a synchronous copy engine, so outputs are identical and only the waiting changes.

Memory is a `runner.memory.tiers.Memory` with the job's per-tier budgets: weights live in their home tiers
(`runner.offload.scheduled.ScheduledLayer`), the two staging slots, the rotary tables, each GPU batch's KV store
and the block's hidden states are allocated or reserved in the gpu pool, and the whole plan is checked
per tier before anything is placed (`BudgetError`, naming the parts and the shortfall). Not accounted:
per-op temporaries inside a unit (MLP intermediates, attention scores) and the KV store's small side
buffers (padding bias, policy scores).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runner.offload.activations import ActivationHome
from runner.model.config import ModelConfig
from runner.memory.copy_engine import CopyEngine, LinkEmulation
from runner.engines.base import BatchOutput, StopTracker, TextDecoder
from runner.offload.placement import KVPlacer
from runner.kv.protocol import KVCacheBase
from runner.kv.spec import KVSettings
from runner.model import kernels
from runner.model.layers import Attention, ForwardState, build_units
from runner.engines.lm import PREFILL_GROUP_TOKENS, Batch, set_rope
from runner.memory.tiers import BudgetError, Memory, Reservation, Tier, TierBudgets
from runner.units import format_bytes
from runner.offload.scheduled import ScheduledLayer, WeightRead
from runner.offload.policy import OffloadPolicy
from runner.offload.sizing import SLOTS, activation_elems, block_need, rope_tables, weight_need
from runner.engines.sampling import SamplingParams, next_tokens

__all__ = ["Executor", "OffloadPolicy", "ScheduledLayer"]

COPY_THREADS = 2  # overlap on: background copy threads (torch copies release the GIL)


@dataclass(frozen=True)
class _Frame:
    """What `runner.engines.lm.Batch` reads of its model outside prefill()/decode(): the executor runs the units itself."""
    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype


class _GpuBatch:
    """One GPU batch of a block: its `Batch` (ids, positions, KV store) and where it is in the step."""

    def __init__(self, frame: _Frame, prompts: list[list[int]], max_new_tokens: int, kv: KVSettings | None,
                 make_cache: Callable[[int, int], KVCacheBase] | None, greedy: bool):
        self.batch = Batch(frame, prompts, max_new_tokens, kv, make_cache, greedy)  # type: ignore[arg-type]
        self.states: list[ForwardState] = []
        self.hidden: list[Tensor] = []  # per row group: ids in, hidden states between layers, logits out
        self.tokens: Tensor | None = None

    @property
    def state(self) -> ForwardState:
        """The decode step's forward state (a decode step is one row group)."""
        return self.states[0]

    def begin(self, i: int, rope: tuple[Tensor, Tensor] | None) -> None:
        """Token i's forward states: the prompt at i == 0 (in row groups, as `runner.engines.lm.Batch.prefill`
        runs it, when the KV store takes partial writes), then the token sampled last step."""
        b = self.batch
        if i == 0:
            rows = b.ids.shape[0]
            # Plain KV caches take a prefill in row groups (faster at big batches); tiered ones whole.
            per = max(1, PREFILL_GROUP_TOKENS // b.prompt_width) if b.kv.cache.groupable else rows
            groups = [slice(r, r + per) for r in range(0, rows, per)]
            self.states = [b.prefill_state(g) for g in groups]
            self.hidden = [b.ids[g] for g in groups]
        else:
            self.states, self.hidden = [b.decode_state()], [self.tokens[:, None]]
        for state in self.states:
            set_rope(state, rope)

    def forward(self, layer: ScheduledLayer, w: dict[str, Tensor]) -> None:
        self.hidden = [layer.forward(w, h, state) for h, state in zip(self.hidden, self.states)]

    @property
    def logits(self) -> Tensor:
        """(rows, v) after the head; a greedy batch's head gives its tokens (rows,) instead."""
        return self.hidden[0] if len(self.hidden) == 1 else torch.cat(self.hidden)

    def end(self, i: int) -> None:
        b = self.batch
        b.kv.length = b.prompt_width if i == 0 else b.kv.length + 1


def screens_greedy(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the executor's greedy tokens come from the head's bf16 screen, as the plain engine's do
    (`kernels.bf16_screen`): the argmax of the fp32 logits, not of the bf16 ones, where a near-tie
    could go the other way. A bf16 head is its own screen; an fp32 one's logits are fp32 already."""
    return dtype == torch.bfloat16 and kernels.bf16_screen(device, dtype)


class Executor:
    """Generation for blocks of prompts with weights across tiers; an `Engine` (see runner.engines)."""

    name = "alisa"

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, Tensor], tokenizer: TextDecoder, *,
                 policy: OffloadPolicy, budgets: TierBudgets, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, kv: KVSettings | None = None, gpu_batch_size: int = 1,
                 num_gpu_batches: int = 1, link: LinkEmulation | None = None):
        # The picks' data path is a placement choice: the store reads it from its KV settings.
        kv = dataclasses.replace(kv or KVSettings(), pick_buffer=policy.pick_buffer)
        self.cfg, self.tokenizer, self.policy, self.kv = cfg, tokenizer, policy, kv
        self.device, self.dtype = torch.device(device), dtype
        self.gpu_batch_size, self.num_gpu_batches = gpu_batch_size, num_gpu_batches
        if self.device.type == "cuda" and not policy.pin_weight:
            raise ValueError("offload.pin_weight: false is not implemented yet (the cpu pool is pinned on CUDA)")
        self.memory = Memory(budgets, self.device)
        self.layers: list[ScheduledLayer] = []
        self.slots: list[Tensor] = []
        self._gpu_owned: list[Tensor] = []  # rotary tables
        self.rope: tuple[Tensor, Tensor] | None = None
        self._loads = 0  # weight loads so far: picks the staging slot
        # Made in the try below; None until then, so that close() frees whatever a failure left.
        self.engine: CopyEngine | None = None
        self.placer: KVPlacer | None = None
        self.acts: ActivationHome | None = None
        try:
            self._place(weights)
            self.engine = CopyEngine(self.memory, threads=COPY_THREADS if policy.overlap else 0, link=link)
            self.placer = KVPlacer(cfg, policy, kv, self.memory, self.engine, dtype)
            self.acts = None if policy.act_tier is Tier.GPU else ActivationHome(self.memory, self.engine,
                                                                                 policy.act_tier, dtype)
        except BaseException:
            self.close()
            raise
        self.link = link
        self._attn_after = _next_attention(self.layers)
        self.reset_stats()

    # ---- placement ---------------------------------------------------------------------------
    def _place(self, weights: Mapping[str, Tensor]) -> None:
        need, staging = weight_need(self.cfg, self.policy, self.dtype)
        for tier, parts in need.items():
            _check_fits(self.memory, tier, parts)
        self.layers = [ScheduledLayer(u, weights, self.policy, self.memory, self.dtype) for u in build_units(self.cfg)]
        self.slots = [self.memory.gpu.alloc((staging,), self.dtype, f"weight staging slot {s}") for s in range(SLOTS)]
        rope = rope_tables(self.cfg, self.dtype, self.device)
        if rope is not None:
            self.rope = tuple(self._gpu_copy(t, f"rotary table {name}") for t, name in zip(rope, ("cos", "sin")))

    def _gpu_copy(self, t: Tensor, label: str) -> Tensor:
        out = self.memory.gpu.alloc(t.shape, t.dtype, label)
        self._gpu_owned.append(out)
        return out.copy_(t)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 observe: Callable[[int, Tensor], None] | None = None) -> BatchOutput:
        """Generate for one block (<= gpu_batch_size * num_gpu_batches prompts). `observe(i, logits)` sees
        each step's logits (block rows in prompt order) before sampling, e.g. for equivalence tests."""
        cap = self.gpu_batch_size * self.num_gpu_batches
        if not 0 < len(prompts) <= cap:
            raise ValueError(f"executor: a block holds 1..{cap} prompts (gpu_batch_size x num_gpu_batches), "
                             f"got {len(prompts)}")
        tracker = StopTracker(len(prompts), params, self.tokenizer)
        groups = [prompts[r:r + self.gpu_batch_size] for r in range(0, len(prompts), self.gpu_batch_size)]
        reservations = self._reserve_block(groups, params.max_new_tokens)
        try:
            with torch.inference_mode():
                make_cache = self.placer.cache_factory()
                greedy = self._screens(params) and observe is None
                block = [_GpuBatch(_Frame(self.cfg, self.device, self.dtype), g, params.max_new_tokens, self.kv,
                                   make_cache, greedy) for g in groups]
                t0 = time.perf_counter()
                t1 = self._loop(block, params, tracker, generator, observe, greedy)
                self.engine.sync()  # the last KV write-backs are part of the run
                t2 = time.perf_counter()
                stores = [b.batch.kv for b in block]
                kv_total, kv_per_token = sum(s.nbytes for s in stores), stores[0].cache.bytes_per_token()
        finally:
            self.engine.sync()
            self.placer.end_block()
            if self.acts is not None:
                self.acts.end_block()
            for r in reservations:
                self.memory.gpu.release(r)
        phases: dict[str, float] = {}
        for s in stores:
            for name, sec in (s.clock.totals.items() if s.clock.enabled else ()):
                phases[name] = phases.get(name, 0.0) + sec
        return BatchOutput(sequences=tracker.outputs, prefill_s=t1 - t0, decode_s=t2 - t1,
                           prompt_tokens=sum(len(p) for p in prompts), generated_tokens=sum(tracker.steps),
                           kv_bytes=kv_total, kv_bytes_per_token=kv_per_token, kv_phase_s=phases)

    def _screens(self, params: SamplingParams) -> bool:
        return not params.do_sample and screens_greedy(self.device, self.dtype)

    def _loop(self, block: list[_GpuBatch], params: SamplingParams, tracker: StopTracker,
              generator: torch.Generator | None, observe: Callable[[int, Tensor], None] | None,
              greedy: bool) -> float:
        """The zig-zag block schedule; returns when the first token (prefill) was done. `greedy`: the
        head gives the tokens itself."""
        n_layers, n_batches, first_done = len(self.layers), len(block), 0.0
        pending = self.load_weight(0)  # weights of (token 0, layer 0)
        for i in range(params.max_new_tokens):  # token i
            step_start = time.perf_counter()
            self._step_marks = (self.engine.transfer_wait_s, self.placer.traffic().recompute_s)
            for b in block:
                b.begin(i, self.rope)
            for j, layer in enumerate(self.layers):  # layer j: its weights serve every GPU batch
                w = pending.wait()
                pending = self.load_weight((j + 1) % n_layers)  # prefetch (i, j+1), or (i+1, 0) after the head
                for k in range(n_batches):  # GPU batch k
                    b = block[k]
                    if i > 0:
                        self._load_next_cache(block, j, k)  # (j, k+1), or the next attention layer's (j', 0)
                    self._forward(layer, w, b, j, k, n_batches)
                    if i > 0:
                        layer.store_cache(b.state)  # this batch's new KV back to its home (in the background)
            if observe is not None:
                observe(i, torch.cat([b.logits for b in block]))  # (rows, v): the head's output
            for b in block:
                b.tokens = b.logits if greedy else next_tokens(b.logits, params, generator)
                b.end(i)
            all_done = tracker.add(torch.cat([b.tokens for b in block]).tolist())
            if i == 0:
                first_done = time.perf_counter()
            else:
                self._time_step(block[0].batch.kv.length, time.perf_counter() - step_start)
            if all_done:
                break
        return first_done

    def _forward(self, layer: ScheduledLayer, w: dict[str, Tensor], b: _GpuBatch, j: int, k: int, n: int) -> None:
        """Layer j on GPU batch k; with activations off the gpu, its input comes up from their home (the
        next (layer, batch)'s is prefetched meanwhile) and its output goes back, except the head's logits."""
        if self.acts is None:
            b.forward(layer, w)
            return
        nj, nk = (j, k + 1) if k + 1 < n else (j + 1, 0)
        if 0 < nj < len(self.layers) and (nj, nk) != (j, k) and nk != k:
            self.acts.prefetch(nk)
        if j > 0:
            b.hidden = self.acts.take(k)
        b.forward(layer, w)
        if j < len(self.layers) - 1:
            self.acts.store(k, b.hidden)
            b.hidden = []

    def _load_next_cache(self, block: list[_GpuBatch], j: int, k: int) -> None:
        if k + 1 < len(block):
            self.layers[j].load_cache(block[k + 1].state)
        elif (nj := self._attn_after[j]) is not None:
            self.layers[nj].load_cache(block[0].state)

    def _time_step(self, length: int, seconds: float) -> None:
        """Decode step time, and the part of it blocked on copies and spent recomputing K/V, by the ALISA
        phase of the sequence length the step ended at (compute is the rest)."""
        phases = self.placer.phases
        phase = phases.phase(length) if phases is not None else 1
        wait, recompute = self.engine.transfer_wait_s, self.placer.traffic().recompute_s
        totals = self._phase_s[phase - 1]
        totals[0] += seconds
        totals[1] += wait - self._step_marks[0]
        totals[2] += recompute - self._step_marks[1]
        self._step_marks = (wait, recompute)

    def load_weight(self, j: int) -> WeightRead:
        """Start loading layer j's weights into the staging slot the running layer does not use: loads
        alternate between the slots, and at most one load is pending while one layer computes."""
        self._loads += 1
        return self.layers[j].load_weight(self.slots[self._loads % SLOTS], self.engine)

    # ---- accounting --------------------------------------------------------------------------
    def _reserve_block(self, groups: Sequence[list[list[int]]], max_new: int) -> list[Reservation]:
        """Check the block's KV (every tier) and hidden states fit; hold the gpu parts the caches do
        not allocate themselves (the plain KV store, hidden states), and set up the KV placement."""
        shapes = [(len(g), max(len(p) for p in g) + max_new) for g in groups]
        need = block_need(self.cfg, self.placer, self.policy.act_tier, shapes, max_new, self.dtype)
        acts = activation_elems(self.cfg, shapes, max_new)
        for tier, parts in need.items():
            _check_fits(self.memory, tier, parts)
        held = {label: n for label, n in need[Tier.GPU].items()
                if label.startswith(("activations", "logits", "SWA picks")) or not self.placer.offloaded}
        reservations = [self.memory.gpu.reserve(n, label) for label, n in held.items()]
        self.placer.begin_block(shapes, max_new)
        if self.acts is not None:
            self.acts.begin_block(acts)
        return reservations

    def reset_stats(self) -> None:
        """Measure peaks, bytes moved and times from now (e.g. after a warm-up run)."""
        for t in Tier:
            self.memory.pool(t).reset_peak()
        self._moved_base = self.memory.moved()
        self._wait_base = self.engine.transfer_wait_s
        self._busy_base = self.engine.link_busy_s()
        self._phase_s = [[0.0, 0.0, 0.0] for _ in range(3)]  # per phase: step time, transfer wait, recompute
        self._step_marks = (0.0, 0.0)
        self.placer.reset()

    def stats(self) -> dict[str, int | float]:
        """Peak bytes per tier, bytes moved per direction and the time breakdown since the last reset."""
        peaks, moved = self.memory.peaks(), self.memory.moved()
        delta = {d: moved[d] - self._moved_base.get(d, 0) for d in moved}
        kv = self.placer.traffic()
        busy = {d: s - self._busy_base[d] for d, s in self.engine.link_busy_s().items()}
        out: dict[str, int | float] = {
            "peak_gpu_pool_bytes": peaks["gpu"], "peak_cpu_pool_bytes": peaks["cpu"],
            "peak_disk_bytes": peaks["disk"], "bytes_gpu_from_cpu": delta["gpu<-cpu"],
            "bytes_cpu_from_gpu": delta["cpu<-gpu"], "bytes_disk_read": delta["disk_read"],
            "bytes_disk_write": delta["disk_write"], "kv_bytes_gpu_from_cpu": kv.up_bytes,
            "kv_bytes_cpu_from_gpu": kv.down_bytes, "kv_bytes_fetched_ahead": kv.ahead_bytes,
            "transfer_wait_s": round(self.engine.transfer_wait_s - self._wait_base, 4),
            "link_busy_gpu_from_cpu_s": round(busy["gpu<-cpu"], 4),
            "link_busy_cpu_from_gpu_s": round(busy["cpu<-gpu"], 4)}
        if self.placer.phases is not None:
            for p, (sec, wait, recompute) in enumerate(self._phase_s, start=1):
                out.update({f"phase{p}_s": round(sec, 4), f"phase{p}_wait_s": round(wait, 4),
                            f"phase{p}_recompute_s": round(recompute, 4),
                            f"phase{p}_compute_s": round(sec - wait - recompute, 4)})
            out.update(recompute_s=round(kv.recompute_s, 4), recomputed_tokens=kv.recomputed,
                       recompute_saved_bytes=kv.recompute_saved_bytes)
        return out

    def close(self) -> None:
        """Stop the copy threads, free every allocation and delete the disk files (idempotent)."""
        if self.placer is not None:
            self.placer.end_block()
        if self.acts is not None:
            self.acts.end_block()
        if self.engine is not None:
            self.engine.close()
        for layer in self.layers:
            layer.free()
        for t in self.slots + self._gpu_owned:
            self.memory.gpu.free(t)
        self.layers, self.slots, self._gpu_owned = [], [], []
        self.memory.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _next_attention(layers: list[ScheduledLayer]) -> list[int | None]:
    """For each layer index, the index of the next attention unit after it (None after the last)."""
    out: list[int | None] = [None] * len(layers)
    nxt = None
    for j in range(len(layers) - 1, -1, -1):
        out[j] = nxt
        if isinstance(layers[j].unit, Attention):
            nxt = j
    return out


def _check_fits(memory: Memory, tier: Tier, parts: Mapping[str, int]) -> None:
    """Raise one BudgetError naming every part of the plan for `tier` if together they exceed what is free."""
    pool = memory.pool(tier)
    total = sum(parts.values())
    label = "plan (" + " + ".join(f"{name} {format_bytes(n)}" for name, n in parts.items() if n) + ")"
    if tier is Tier.DISK and total:
        memory.disk.check_space(total, label)
    free = pool.free_bytes()
    if free is not None and total > free:
        raise BudgetError(tier, label, total, pool.budget, pool.in_use)
