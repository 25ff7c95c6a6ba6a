"""A batch's KV: storage (dense or quantized), the policy that selects what each step
attends to, the token scores it selects by, and the retain/evict storage mode.

- retain: every token's KV is kept; each decode step gathers the selected slots into
  dense tensors and attends over them (ALISA's accuracy setting; what offloading builds on).
- evict: slots the policy does not select are freed for good; storage holds at most
  budget + 1 tokens per sequence (H2O's real drop). Slots then no longer equal positions,
  so each layer keeps `slot_pos`, the position each slot holds.

The prompt is always attended densely (the paper's SWA is a decode-time algorithm);
scoring policies get their first scores from the prompt's own attention rows.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor

from policies import Selection
from runner.model import ops as M
from runner.model.attention_kv import Projector
from runner.model.config import ModelConfig
from runner.kv.cache import KVCache, take_slots
from runner.kv.picks import PickBuffer, layers_bytes
from runner.kv.protocol import KVCacheBase
from runner.kv.spec import KVMode as Mode, KVSettings, QuantAxis
from runner.kv.scores import ScoreState

# Prompt queries scored per chunk: keeps the explicit (b, nh, chunk, s) fp32 probabilities <= 64 MB.
_PROBS_BYTES = 64 << 20


PHASES = ("store", "score", "select", "gather", "attend")


class PhaseClock:
    """Wall time per decode phase, summed over layers and steps (off unless profiling: on
    CUDA each lap synchronizes the device, which would itself slow the run)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._t = self._now()

    def lap(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.totals[phase] += now - self._t
            self._t = now

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _make_cache(cfg: ModelConfig, kv: KVSettings, batch: int, capacity: int, dtype: torch.dtype,
                device: torch.device) -> KVCacheBase:
    if kv.bits == 16:
        return KVCache(cfg, batch, capacity, dtype, device)
    from runner.kv.quant import QuantizedKVCache
    return QuantizedKVCache(cfg, batch, capacity, dtype, device, bits=kv.bits, group_size=kv.group_size,
                            axis=kv.quant_axis.value)


def _pick_buffers(cfg: ModelConfig, kv: KVSettings, scored: bool) -> list[PickBuffer] | None:
    """Retain mode with a scoring policy keeps its picks packed per layer (see runner.kv.picks), unless
    `pick_buffer` is off; not for channel-axis quantization, whose slots cannot be read one by one."""
    if (not scored or not kv.pick_buffer or kv.mode is Mode.EVICT
            or (kv.bits != 16 and kv.quant_axis is QuantAxis.CHANNEL)):
        return None
    return [PickBuffer() for _ in range(cfg.num_layers)]


def kv_capacity(kv: KVSettings, max_len: int) -> int:
    """Token slots per sequence a store allocates: all positions, or budget + 1 in evict mode."""
    return min(max_len, kv.policy.budget(max_len) + 1) if kv.mode is Mode.EVICT else max_len


@functools.lru_cache(maxsize=4096)  # pure; the plan search asks for the same shapes many times
def kv_bytes(cfg: ModelConfig, kv: KVSettings, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of KV storage a store for `batch` sequences of `max_len` tokens allocates: the cache
    (exact: the same class built on the meta device, which allocates nothing) plus, in retain
    mode with a scoring policy, the packed picks at their largest (one layer's gather without
    `pick_buffer`: it lives until that layer's attention is done; only token-tiered caches, which
    this plain store is not, also fetch the next layer's ahead)."""
    nbytes = _make_cache(cfg, kv, batch, kv_capacity(kv, max_len), dtype, torch.device("meta")).nbytes
    scoring = kv.policy.scoring
    buffered = _pick_buffers(cfg, kv, scoring is not None) is not None
    gathered = scoring is not None and not kv.pick_buffer and kv.mode is Mode.RETAIN
    if not (buffered or gathered):
        return nbytes
    m = sum(kv.policy.split(max_len))  # the whole selection (KVStore.pack_recent) at the longest length
    layers = cfg.num_layers if buffered else 1
    return nbytes + layers_bytes(cfg, scoring.per_head, batch, m, layers, dtype)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """Per-slot values x (b, g', n) at slot index (m,) or (b, g, m) -> (b, g, m)."""
    if index.dim() == 1:
        return x[..., index]
    return x.expand(index.shape[0], index.shape[1], -1).gather(-1, index)


class KVStore:
    def __init__(self, cfg: ModelConfig, kv: KVSettings, valid: Tensor, dtype: torch.dtype, device: torch.device,
                 make_cache: Callable[[int, int], KVCacheBase] | None = None):
        """valid: (b, L) bool over all positions (prompt + new tokens), False on left padding.
        make_cache(batch, capacity): the storage, when not the plain one on `device` (the block
        executor's tiered caches: runner.offload.sequence_kv, runner.offload.token_kv)."""
        self.cfg, self.kv, self.policy = cfg, kv, kv.policy
        b, max_len = valid.shape
        self.length = 0  # positions written so far (all rows share them)
        self.padded = not bool(valid.all())
        self.bias = torch.zeros((b, 1, max_len), dtype=dtype, device=device)  # additive, -inf on padding
        self.bias.masked_fill_(~valid[:, None, :], float("-inf"))
        scoring = self.policy.scoring
        self.groups = cfg.num_kv_heads if scoring is not None and scoring.per_head else 1
        self.evict = kv.mode is Mode.EVICT
        self.clock = PhaseClock(kv.profile, device)
        capacity = kv_capacity(kv, max_len)
        self.cache = make_cache(b, capacity) if make_cache else _make_cache(cfg, kv, b, capacity, dtype, device)
        self.scores = None
        if scoring is not None:
            track = scoring.permanent and not self.evict
            # fp32 whatever the model's dtype: sums of many small probabilities lose their low bits in
            # 16 bits (and the native decode kernels give fp32 probabilities for a bf16 cache).
            self.scores = [ScoreState(scoring, b, self.groups, max_len, torch.float32, device, track)
                           for _ in range(cfg.num_layers)]
        if self.evict:
            self.slot_pos = [torch.zeros((b, self.groups, capacity), dtype=torch.long, device=device)
                             for _ in range(cfg.num_layers)]
            self.n_slots = [0] * cfg.num_layers
        self.unflushed: dict[int, tuple[int, int]] = {}  # per layer: slots written but not flushed (evict)
        self.picks = _pick_buffers(cfg, kv, scoring is not None)
        self.ahead: dict[int, tuple[int, Tensor | None, Selection | None]] = {}  # per layer: (n, scores, sel)
        # With everything on one device the layer's PickBuffer holds the whole selection, recent
        # run included: attention is then one QK^T and one PV matmul over one dense buffer (the
        # recent run costs one token's copy per step), not two parts joined by cat and add. A
        # tiered cache keeps its recent run in the gpu window alone: a second copy there would
        # cost the scarce accelerator memory the executor plans for.
        self.pack_recent = make_cache is None

    @property
    def nbytes(self) -> int:
        """KV storage plus the retain mode's packed picks (a copy of up to half the budget)."""
        return self.cache.nbytes + sum(p.nbytes for p in self.picks or ())

    @property
    def wants_inputs(self) -> bool:
        """Whether the storage keeps layer inputs to recompute K/V from (ALISA phase III)."""
        return self.cache.wants_inputs

    def observe_inputs(self, layer: int, h: Tensor, positions: Tensor, start: int, project: Projector) -> None:
        """Layer inputs h (b, s, hidden) of slots start.. at rotary `positions` (b, s), and how to
        project them to K/V."""
        self.cache.observe_inputs(layer, h, positions, start, project)

    def select_rows(self, index: Tensor) -> "KVStore":
        """A new store holding batch rows `index` (b',) of this one, copied; rows may repeat,
        e.g. to score several continuations of one prefilled context."""
        out = KVStore.__new__(KVStore)
        out.__dict__.update(self.__dict__)
        out.bias = self.bias[index]
        out.padded = bool(torch.isinf(out.bias).any())
        out.cache = self.cache.select_rows(index)
        if self.scores is not None:
            out.scores = [s.select_rows(index) for s in self.scores]
        if self.evict:
            out.slot_pos = [p[index] for p in self.slot_pos]
            out.n_slots = list(self.n_slots)
        out.picks = _pick_buffers(self.cfg, self.kv, self.scores is not None)  # refilled on the next step
        out.ahead, out.unflushed = {}, {}
        return out

    def prefetch(self, layer: int) -> None:
        """Start this layer's KV of the next decode step towards the gpu (the block executor's
        load_cache, while earlier layers compute): FlexGen's per-sequence split loads the layer whole;
        a token-tiered cache fetches the cpu-resident tokens the step will read (the recent run's
        oldest, if the gpu window is shorter, and without pick buffers every pick), selected now (the
        layer's scores are final since its last step) and kept for the step itself."""
        # A cache that loads the layer whole starts here: its slots so far (evict mode's are compacted).
        self.cache.prefetch(layer, self.n_slots[layer] if self.evict else self.length)
        n = self.length + 1
        if not self.cache.fetches_ahead or self.evict or \
                self.ahead.get(layer, (0,))[0] == n:  # already under way (the executor asks once per unit)
            return
        scores = self.scores[layer].current(n, self.policy.score_window(n)) if self.scores else None
        sel = self.policy.select(n, n, scores, self.bias.device)
        self.ahead[layer] = (n, scores, sel)
        # The step reads the recent run (all n without a selection) in place, where the gpu window
        # holds it, and the picks (those new to the layer's buffer, when it has one, come in the layer).
        buffered = self.picks is not None
        self.cache.fetch_ahead(layer, n, 0 if sel is None else n - sel.recent,
                               None if sel is None or buffered else sel.picks)

    def flush(self, layer: int) -> None:
        """Write this decode step's new KV of `layer` back to a tiered cache's homes (the executor's
        store_cache): the new token's slot, or none after evict mode compacted the slots (the cache's
        `compact` moved them on every tier itself)."""
        start, end = self.unflushed.pop(layer, (self.length, self.length + 1))
        self.cache.flush(layer, start, end)

    # ---- prefill -------------------------------------------------------------------------
    def prefill(self, layer: int, rows: slice, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Dense causal attention over the prompt rows; stores their KV (and first scores)."""
        out = M.attention_prefill(q, k, v, mask)
        if self.scores is not None:
            self.scores[layer].set_prompt(rows, self._prompt_scores(layer, q, k, mask))
        if self.evict:
            k, v = self._evict_prompt(layer, rows, k, v)
        self.cache.rows(rows).write(layer, k, v, 0)
        return out

    def _prompt_scores(self, layer: int, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """Weighted sum of the prompt's attention rows, (rows, g, s), as the policy scores them:
        only the rows of the scored queries (SWA: the last `window`) are computed, in chunks."""
        b, nh, s, _ = q.shape
        first, weights = self.scores[layer].prompt_weights(s, self.policy.score_window(s))
        chunk = max(1, _PROBS_BYTES // (b * nh * s * 4))  # fp32 scores
        total = M.attention_column_sums(q[:, :, first:], k, first, None if mask is None else mask[:, :, first:],
                                        weights, chunk)  # (b, kvh, s), fp32
        return total if self.groups > 1 else total.sum(1, keepdim=True)  # (b, g, s)

    def _evict_prompt(self, layer: int, rows: slice, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        s = k.shape[2]
        scores = self.scores[layer].current(s, self.policy.score_window(s))[rows] if self.scores else None
        sel = self.policy.select(s, s, scores, k.device)
        if sel is not None:
            sel = sel.ordered()  # compacted slots keep age order
        pos = self.slot_pos[layer][rows]
        index = None if sel is None else sel.index(s, k.device)
        if index is None:
            pos[..., :s] = torch.arange(s, device=k.device)
            self.n_slots[layer] = s
            return k, v
        pos[..., :index.shape[-1]] = index
        self.n_slots[layer] = index.shape[-1]
        return take_slots(k, index), take_slots(v, index)

    # ---- decode --------------------------------------------------------------------------
    def decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One new token per row: store its KV, select, attend, update scores. -> (b, nh, 1, d)"""
        if self.evict:
            return self._decode_evict(layer, q, k, v)
        if self.cache.cpu_compute:  # FlexGen's cpu_cache_compute: dense, attention by tier
            self.cache.write(layer, k, v, self.length)
            bias = self.bias[..., :self.length + 1].unsqueeze(2) if self.padded else None
            return self.cache.attend(layer, q, self.length + 1, bias)
        n, clock = self.length + 1, self.clock
        clock.start()
        self.cache.write(layer, k, v, n - 1)
        clock.lap("store")
        state = self.scores[layer] if self.scores else None
        window = self.policy.score_window(n)
        ahead = self.ahead.pop(layer, None)
        if ahead is not None and ahead[0] == n:  # selected by prefetch
            _, scores, sel = ahead
        else:
            scores = state.current(n, window) if state else None
            clock.lap("score")
            sel = self.policy.select(n, n, scores, q.device)
        clock.lap("select")
        index, keys, values = self._read_selected(layer, sel, n, need_index=bool(state or self.padded))
        self.cache.drop_ahead(layer)  # the step's reads are done
        if sel is None:
            bias = self.bias[..., :n] if self.padded else None
        else:
            bias = self._selected_bias(_take(self.bias[..., :n], index) if self.padded else None,
                                       _take(scores, index) if state and state.alive is not None else None)
        clock.lap("gather")
        out, probs = M.attention_decode(q, keys, values, None if bias is None else bias.unsqueeze(2))
        clock.lap("attend")
        if state:
            state.observe(index, self._reduce(probs), window)
            if index is not None:
                state.keep_only(n, index)
            clock.lap("score")
        return out

    def _read_selected(self, layer: int, sel: Selection | None, n: int,
                       need_index: bool) -> tuple[Tensor | None, Tensor | list[Tensor], Tensor | list[Tensor]]:
        """(index, keys, values): the selected KV as parts to attend over and, if needed, the
        positions they hold in the same order (None = all n). Per-row picks come from the
        layer's PickBuffer (only new slots copied in): with `pack_recent` it holds the recent run
        too, else the recent run is read in place. Shared picks (a fixed pattern, the same for
        every row) come from a gather beside the recent run."""
        if sel is None:
            keys, values = self.cache.read(layer, n)
            return None, keys, values
        per_row = sel.picks is not None and sel.picks.dim() > 1 and self.picks is not None
        if per_row and self.pack_recent:  # before reading the recent run: a quantized read dequantizes it
            packed_k, packed_v, pos = self.picks[layer].update(self.cache, layer, sel.picks, n, sel.recent)
            return pos, packed_k, packed_v  # pos: the positions the buffer holds, in its slot order
        keys, values = self.cache.read(layer, n, n - sel.recent)  # (b, kvh, recent, d)
        if sel.picks is None:
            return (sel.index(n, keys.device) if need_index else None), keys, values
        if not per_row:
            picked_k, picked_v = self.cache.gather(layer, sel.picks)
            return (sel.index(n, keys.device) if need_index else None), [picked_k, keys], [picked_v, values]
        picked_k, picked_v, pos = self.picks[layer].update(self.cache, layer, sel.picks, n - sel.recent)
        index = None
        if need_index:
            tail = torch.arange(n - sel.recent, n, device=pos.device)
            index = torch.cat((pos, tail.expand(*pos.shape[:2], -1)), dim=-1)  # (b, g, m), buffer order
        return index, [picked_k, keys], [picked_v, values]

    def _decode_evict(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        slot, length, clock = self.n_slots[layer], self.length + 1, self.clock
        clock.start()
        self.cache.write(layer, k, v, slot)
        pos = self.slot_pos[layer]
        pos[..., slot] = length - 1
        n = slot + 1
        clock.lap("store")
        state = self.scores[layer] if self.scores else None
        window = self.policy.score_window(length)
        scores = state.current(length, window).gather(-1, pos[..., :n]) if state else None
        clock.lap("score")
        sel = self.policy.select(n, length, scores, q.device)
        clock.lap("select")
        if sel is not None:
            index = sel.ordered().index(n, q.device)  # compacted slots keep age order
            self.cache.compact(layer, index)
            n = index.shape[-1]
            pos[..., :n] = _take(pos[..., :slot + 1], index)
        self.unflushed[layer] = (n, n) if sel is not None else (slot, slot + 1)
        self.n_slots[layer] = n
        keys, values = self.cache.read(layer, n)
        bias = self.bias.expand(-1, self.groups, -1).gather(-1, pos[..., :n]) if self.padded else None
        clock.lap("gather")
        out, probs = M.attention_decode(q, keys, values, None if bias is None else bias.unsqueeze(2))
        clock.lap("attend")
        if state:
            state.observe(pos[..., :n], self._reduce(probs), window)
            clock.lap("score")
        return out

    def _selected_bias(self, padding: Tensor | None, scores: Tensor | None) -> Tensor | None:
        """(b, g, m) additive bias over selected slots: -inf on padding and on dead tokens."""
        dead = None if scores is None else torch.zeros_like(scores).masked_fill_(scores.isneginf(), float("-inf"))
        if padding is None:
            return dead
        return padding if dead is None else padding + dead

    def _reduce(self, probs: Tensor) -> Tensor:
        """(b, nh, t) attention -> (b, g, t) scores: per kv head (sum over its group) or per sequence."""
        b, nh, t = probs.shape
        if self.groups > 1:
            return probs.view(b, self.groups, nh // self.groups, t).sum(2)
        return probs.sum(1, keepdim=True)
