"""ALISA's three-phase token-level KV placement (ISCA'24 §V-A): a KV cache whose tokens live in
different tiers by age, behind the `runner.kv.protocol.KVCacheBase` interface the KV store reads through.

At sequence length n (`TokenPhases`):
- phase I (n < p1): every token's K/V is in a window buffer on the `gpu` tier;
- phase II (n >= p1): the oldest `offload_ratio * n` tokens move to the `cpu` tier (INT8 when the
  job's `kv.bits` is 8: quantized on the gpu side, so only codes and group scales cross the link);
  the newer ones, which hold SWA's locally-static recent window, stay in the gpu window;
- phase III (n >= p2): the oldest `recompute_ratio * n` tokens' K/V are deleted from `cpu`; the
  attention input of each layer (one hidden vector per token) is kept on `gpu` instead, and when
  SWA selects such a token its K/V are recomputed there (norm, K/V projection, rotary at its
  position) while the fetch of the cpu-resident picks is in flight.

Reads of the recent run are views of the gpu window. Reads of older tokens (SWA's global picks,
which `runner.kv.picks.PickBuffer` asks for only when they are new to its packed buffer) gather
the selected cpu rows in one batched index copy through the copy engine, so the link (or its
emulation) carries exactly the selected bytes. Tokens move gpu -> cpu in chunks of `chunk`.

Phase III frees host memory: the cpu home is a ring of `TokenPhases.cpu_span` slots per sequence and
head (position p in slot p % span), the most tokens ever cpu-resident at once, so the rows of
positions phase III has deleted (below `recompute_below(n)`) are written over by the next tokens to
leave the gpu window, and no row is reserved for the recent tokens that never left it. The ring is
sized once, up front, at its peak (what the memory plan checks before anything is allocated) rather
than grown and shrunk: the peak is what a budget must admit.

Not modelled: the paper keeps activations in GPU memory (§VI-A), and so does this cache, which on a
GQA model like SmolLM2 (hidden 576 vs K+V 384 per token and layer) costs more gpu bytes than the KV it
replaces.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from runner.model.config import ModelConfig
from runner.memory.copy_engine import CopyEngine, Handle
from runner.kv.cache import flat_rows
from runner.kv.protocol import KVCacheBase, KVTraffic
from runner.kv.quant import QTensor, QuantLayout, check_params, dequantize, quantize
from runner.memory.tiers import Memory
from runner.model.attention_kv import Projector
from runner.offload.phases import TokenPhases


def home_parts(cfg: ModelConfig, batch: int, slots: int, dtype: torch.dtype, bits: int,
               group_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of the tensors one layer's K (or V) cpu home of `slots` ring slots is stored as:
    (b, kvh, slots, d) values, or their `kv.bits` codes with group scales and minimums along the head dim."""
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)  # (b, kvh, slots, d)
    return QuantLayout(bits=bits, group_size=group_size, dim=3).parts(shape, dtype)


def tiered_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, phases: TokenPhases,
                 bits: int, group_size: int, min_len: int = 1) -> tuple[int, int]:
    """(gpu bytes, cpu bytes) a TokenTieredKV allocates, for the up-front budget check: the gpu
    window, the kept activations and their positions; the cpu homes (rings of `phases.cpu_span` slots)."""
    win = phases.window(max_len, min_len)
    act = phases.recompute_span(max_len)
    per_layer_gpu = 2 * batch * cfg.num_kv_heads * win * cfg.head_dim + batch * act * cfg.hidden_size
    slots = phases.cpu_span(max_len, min_len)
    home = sum(math.prod(s) * dt.itemsize for s, dt in home_parts(cfg, batch, slots, dtype, bits, group_size))
    return cfg.num_layers * per_layer_gpu * dtype.itemsize + batch * act * 8, cfg.num_layers * 2 * home


class TokenTieredKV(KVCacheBase):
    """KVCache interface over a gpu window, a cpu home and gpu activations (see module docstring)."""

    wants_inputs = True  # phase III recomputes K/V from them
    fetches_ahead = True  # the cpu-resident tokens a step reads, selected a layer early

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, *, phases: TokenPhases,
                 memory: Memory, engine: CopyEngine, bits: int = 16, group_size: int = 64, min_len: int = 1):
        """min_len: the prompt width (the first write); no shorter length is ever held."""
        self.cfg, self.b, self.max_len, self.dtype = cfg, batch, max_len, dtype
        self.phases, self.memory, self.engine = phases, memory, engine
        self.bits, self.group_size = bits, group_size
        if bits != 16:
            check_params(bits, group_size, cfg.head_dim)
        kvh, d, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        self.win = phases.window(max_len, min_len)
        self.act_len = phases.recompute_span(max_len)
        self.span = phases.cpu_span(max_len, min_len)  # cpu home ring slots
        gpu, cpu = memory.gpu, memory.cpu
        self.wk = [gpu.alloc((batch, kvh, self.win, d), dtype, f"kv window k{j}") for j in range(L)]
        self.wv = [gpu.alloc((batch, kvh, self.win, d), dtype, f"kv window v{j}") for j in range(L)]
        self.acts = [gpu.alloc((batch, self.act_len, cfg.hidden_size), dtype, f"kv activations {j}")
                     for j in range(L)] if self.act_len else []
        # Rotary position of each kept input (slot - left padding): shared by the layers.
        self.act_pos = gpu.alloc((batch, self.act_len), torch.long, "kv activation positions") if self.act_len else None
        self.hk = [self._alloc_home(cpu, f"kv home k{j}") for j in range(L)]
        self.hv = [self._alloc_home(cpu, f"kv home v{j}") for j in range(L)]
        self.base = [0] * L  # position held by window slot 0
        self.lo = [0] * L  # first gpu-resident position
        self.rec = [0] * L  # positions below are recomputed
        self.pending: list[list[Handle]] = [[] for _ in range(L)]  # migrations reading the window
        self.project: list[Projector | None] = [None] * L
        self.ahead: list[_Ahead | None] = [None] * L  # rows fetched before the layer ran (fetch_ahead)
        self.traffic = KVTraffic()

    # ---- storage -----------------------------------------------------------------------------
    def _home_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return home_parts(self.cfg, self.b, self.span, self.dtype, self.bits, self.group_size)

    def _alloc_home(self, pool, label: str) -> list[Tensor]:
        return [pool.alloc(shape, dt, f"{label}.{i}") for i, (shape, dt) in enumerate(self._home_shapes())]

    def free(self) -> None:
        """Return every allocation to its pool (idempotent)."""
        for j in range(len(self.pending)):
            self._settle(j)
            self.drop_ahead(j)
        for t in self.wk + self.wv + self.acts + ([self.act_pos] if self.act_pos is not None else []):
            if self.memory.gpu.owns(t):
                self.memory.gpu.free(t)
        for store in self.hk + self.hv:
            for t in store:
                if self.memory.cpu.owns(t):
                    self.memory.cpu.free(t)
        self.wk, self.wv, self.acts, self.hk, self.hv, self.act_pos = [], [], [], [], [], None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.wk + self.wv + self.acts) + \
            sum(t.numel() * t.element_size() for s in self.hk + self.hv for t in s)

    def bytes_per_token(self) -> int:
        """Bytes of one token's K and V over all layers in its cpu home form (per sequence)."""
        return 2 * self.cfg.num_layers * sum(s[1] * s[3] * dt.itemsize for s, dt in self._home_shapes())

    def rows(self, rows: slice) -> TokenTieredKV:
        if rows.indices(self.b) != (0, self.b, 1):
            raise NotImplementedError("token-tiered KV is written for the whole GPU batch at once")
        return self

    # ---- inputs (activations) ----------------------------------------------------------------
    def observe_inputs(self, layer: int, h: Tensor, positions: Tensor, start: int, project: Projector) -> None:
        """Keep layer inputs h (b, s, hidden) of slots start.. that phase III may recompute, with their
        rotary positions (b, s)."""
        self.project[layer] = project
        end = min(start + h.shape[1], self.act_len)
        if end > start:
            self.acts[layer][:, start:end] = h[:, :end - start]
            self.act_pos[:, start:end] = positions[:, :end - start]

    # ---- writes ------------------------------------------------------------------------------
    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """k, v: (b, kvh, s, d) for positions start..start+s; places them by phase at length start+s."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        if start == 0:
            self._write_prompt(layer, k, v)
            return
        self._migrate(layer, self.phases.gpu_from(end), self.phases.recompute_below(end))
        if end - self.base[layer] > self.win:
            self._slide(layer)
        a, z = start - self.base[layer], end - self.base[layer]
        self.wk[layer][:, :, a:z] = k
        self.wv[layer][:, :, a:z] = v
        self.rec[layer] = self.phases.recompute_below(end)

    def _write_prompt(self, layer: int, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        lo, rec = self.phases.gpu_from(n), self.phases.recompute_below(n)
        if rec < lo:
            self._to_home(layer, k[:, :, rec:lo], v[:, :, rec:lo], rec)
        self.wk[layer][:, :, :n - lo] = k[:, :, lo:]
        self.wv[layer][:, :, :n - lo] = v[:, :, lo:]
        self.base[layer] = self.lo[layer] = lo
        self.rec[layer] = rec

    def _migrate(self, layer: int, lo: int, rec: int) -> None:
        """Move positions lo_old..lo from the gpu window to the cpu home, but for those below rec, which
        phase III deletes at the length that moves them (they never reach the ring, which has no room
        for them: `TokenPhases.cpu_span` counts rec..lo only)."""
        old = self.lo[layer]
        if lo <= old:
            return
        first = max(old, rec)
        if first < lo:
            a, z = first - self.base[layer], lo - self.base[layer]
            # The ring slots about to be written may be the target of an earlier move still in flight (the
            # copy threads need not run in order): long done by now, a chunk of tokens later.
            self._settle(layer)
            self._to_home(layer, self.wk[layer][:, :, a:z], self.wv[layer][:, :, a:z], first)
        self.lo[layer] = lo

    def _to_home(self, layer: int, k: Tensor, v: Tensor, pos: int) -> None:
        """Copy (quantizing first, on the gpu side) K/V (b, kvh, s, d) of positions pos.. to their
        ring slots in the cpu home: one run, or two where it wraps (s never exceeds the ring)."""
        s, a = k.shape[2], pos % self.span
        pieces = [(0, a, min(s, self.span - a))]  # (first source column, first slot, columns)
        if pieces[0][2] < s:
            pieces.append((pieces[0][2], 0, s - pieces[0][2]))
        for x, home in ((k, self.hk[layer]), (v, self.hv[layer])):
            parts = [x] if self.bits == 16 else _parts(quantize(x, self.bits, self.group_size, dim=3))
            for src, h in zip(parts, home):
                for at, slot, m in pieces:
                    dst = (slice(None), slice(None), slice(slot, slot + m))
                    handle = self.engine.submit(h, dst, src[:, :, at:at + m], None)
                    self.pending[layer].append(handle)
                self.traffic.down_bytes += src.numel() * src.element_size()

    def _slide(self, layer: int) -> None:
        """Move the gpu-resident run to the front of the window (its older slots have left)."""
        self._settle(layer)  # in-flight migrations read the slots about to be overwritten
        lo, base = self.lo[layer], self.base[layer]
        keep = slice(lo - base, None)
        for w in (self.wk[layer], self.wv[layer]):
            run = w[:, :, keep].clone()  # the ranges overlap: copy out first
            w[:, :, :run.shape[2]] = run
        self.base[layer] = lo

    def _settle(self, layer: int) -> None:
        for h in self.pending[layer]:
            h.wait()
        self.pending[layer] = []

    # ---- reads -------------------------------------------------------------------------------
    def read(self, layer: int, end: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """K/V of positions start..end: window views when all are on gpu, else assembled copies."""
        lo, base = self.lo[layer], self.base[layer]
        if start >= lo:
            return self.wk[layer][:, :, start - base:end - base], self.wv[layer][:, :, start - base:end - base]
        index = torch.arange(start, min(lo, end), device=self.wk[layer].device)
        old_k, old_v = self.gather(layer, index)
        if end <= lo:
            return old_k, old_v
        k = torch.cat((old_k, self.wk[layer][:, :, lo - base:end - base]), dim=2)
        v = torch.cat((old_v, self.wv[layer][:, :, lo - base:end - base]), dim=2)
        return k, v

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """The selected positions packed dense: (b, kvh, m, d); index (m,) or (b, g, m)."""
        kvh, d = self.cfg.num_kv_heads, self.cfg.head_dim
        k, v = self.take_rows(layer, flat_rows(index, self.b, kvh, self.max_len))
        m = index.shape[-1]
        return k.view(self.b, kvh, m, d), v.view(self.b, kvh, m, d)

    def take_rows(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Positions by flat row number into (b * kvh * max_len, d): (r, d) each, wherever they live;
        cpu-resident rows that `fetch_ahead` already fetched come from there."""
        d = self.cfg.head_dim
        head, pos = rows // self.max_len, rows % self.max_len
        lo, rec = self.lo[layer], self.rec[layer]
        out_k = torch.empty((rows.shape[0], d), dtype=self.dtype, device=self.wk[layer].device)
        out_v = torch.empty_like(out_k)
        on_cpu = ((pos >= rec) & (pos < lo)).nonzero().squeeze(1)
        fetch = early = None
        if self.ahead[layer] is not None and on_cpu.numel():
            early, hit = self._early(layer, rows[on_cpu], on_cpu)
            on_cpu = on_cpu[:0] if hit is None else on_cpu[~hit]  # left: tokens moved to cpu since (the write)
        if on_cpu.numel():
            self._settle(layer)  # a pick may be a token whose move to cpu is still in flight
            fetch = self._fetch(layer, rows[on_cpu])  # in flight while the gpu part and recompute run
        on_gpu = (pos >= lo).nonzero().squeeze(1)
        if on_gpu.numel():
            win_rows = head[on_gpu] * self.win + pos[on_gpu] - self.base[layer]
            out_k[on_gpu] = self.wk[layer].view(-1, d).index_select(0, win_rows)
            out_v[on_gpu] = self.wv[layer].view(-1, d).index_select(0, win_rows)
        gone = (pos < rec).nonzero().squeeze(1)
        if gone.numel():
            out_k[gone], out_v[gone] = self._recompute(layer, head[gone], pos[gone])
        if early is not None:
            at, (k, v) = early
            out_k[at], out_v[at] = k, v
        if fetch is not None:
            out_k[on_cpu], out_v[on_cpu] = self._landed(fetch)
        return out_k, out_v

    # ---- fetching ahead ------------------------------------------------------------------------
    def fetch_ahead(self, layer: int, n: int, start: int, picks: Tensor | None = None) -> None:
        """Start fetching the cpu-resident ones of the positions the step that will reach length n
        reads, the run start..n-1 (n-1 is that step's own token) and `picks` ((m,) or (b, g, m), as
        `gather` takes them), before the layer runs (the executor's load_cache, while earlier layers
        compute), so that the layer's reads wait only on copies already under way. Positions that
        step's write moves to cpu are fetched then; ones phase III will recompute then are not
        fetched. Kept until `drop_ahead`."""
        self.drop_ahead(layer)
        rec, lo = max(self.rec[layer], self.phases.recompute_below(n)), self.lo[layer]
        kvh, device = self.cfg.num_kv_heads, self.wk[layer].device
        parts = []
        if min(n - 1, lo) > max(start, rec):
            parts.append(flat_rows(torch.arange(max(start, rec), min(n - 1, lo), device=device), self.b, kvh,
                                   self.max_len))  # ascending
        if picks is not None:
            rows = flat_rows(picks, self.b, kvh, self.max_len)
            pos = rows % self.max_len
            parts.append(rows[(pos >= rec) & (pos < lo)])
        if not parts:
            return
        rows = torch.cat(parts)  # in the order the reads will ask (picks never repeat the run's positions)
        if rows.numel():
            self._settle(layer)  # a pick may be a token whose move to cpu is still in flight
            before = self.traffic.up_bytes
            self.ahead[layer] = _Ahead(rows, parts[0].numel() if len(parts) == 2 else 0, self._fetch(layer, rows))
            self.traffic.ahead_bytes += self.traffic.up_bytes - before

    def _early(self, layer: int, rows: Tensor, at: Tensor) -> tuple[tuple[Tensor, tuple[Tensor, Tensor]], Tensor | None]:
        """The fetched-ahead K/V of the `rows` it holds (their places `at` in the output), and which
        of `rows` it holds (None: all)."""
        got = self.ahead[layer]
        if got.landed is None:  # the step's reads (recent run, picks) share one dequantized copy
            got.landed = self._landed(got.copies)
        k, v = got.landed
        for a, z in ((0, got.run), (got.run, got.rows.numel())):
            if z - a == rows.numel() and torch.equal(got.rows[a:z], rows):  # the read asks for what was fetched
                return (at, (k[a:z], v[a:z])), None
        # Some rows moved to cpu since (this step's write): look each one up.
        if got.keys is None:
            got.keys, got.order = got.rows.sort()
        i = torch.searchsorted(got.keys, rows).clamp_(max=got.keys.numel() - 1)
        hit = got.keys[i] == rows
        slot = got.order[i[hit]]
        return (at[hit], (k[slot], v[slot])), hit

    def drop_ahead(self, layer: int) -> None:
        """Release what `fetch_ahead` fetched for `layer` (the store calls it once the step's reads are done)."""
        got, self.ahead[layer] = self.ahead[layer], None
        for _, handles in got.copies if got is not None else ():
            for h in handles:
                h.wait()  # the engine may still be writing into the buffers

    def _fetch(self, layer: int, rows: Tensor) -> list[tuple[list[Tensor], list[Handle]]]:
        """Start copying the home rows of flat rows `rows` (into (b * kvh * max_len, d), as `take_rows`
        takes them; cpu-resident ones only) up to the gpu: one batched index copy per stored tensor."""
        # Flat row of position p of sequence-head h -> its ring row, h * span + p % span.
        rows = rows // self.max_len * self.span + rows % self.max_len % self.span
        out = []
        for home in (self.hk[layer], self.hv[layer]):
            dsts, handles = [], []
            for t in home:
                flat = t.view(-1, t.shape[-1])
                dst = torch.empty((rows.shape[0], t.shape[-1]), dtype=t.dtype, device=self.wk[layer].device)
                handles.append(self.engine.submit(dst, None, flat, (rows.to(flat.device),)))
                self.traffic.up_bytes += dst.numel() * dst.element_size()
                dsts.append(dst)
            out.append((dsts, handles))
        return out

    def _landed(self, fetch: list[tuple[list[Tensor], list[Handle]]]) -> tuple[Tensor, Tensor]:
        kv = []
        for dsts, handles in fetch:
            for h in handles:
                h.wait()
            if self.bits == 16:
                kv.append(dsts[0])
                continue
            data, scale, mn = dsts
            shape = torch.Size((data.shape[0], self.cfg.head_dim))
            kv.append(dequantize(QTensor(data, scale, mn, self.bits, self.group_size, 1, shape), self.dtype))
        return kv[0], kv[1]

    def _recompute(self, layer: int, head: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of (row * kvh + head, position) pairs from the stored layer inputs."""
        t0 = time.perf_counter()
        kvh = self.cfg.num_kv_heads
        token = (head // kvh) * self.act_len + pos  # flat row into (b * act_len, hidden)
        unique, inverse = torch.unique(token, return_inverse=True)
        h = self.acts[layer].view(-1, self.cfg.hidden_size).index_select(0, unique)
        k, v = self.project[layer](h, self.act_pos.view(-1).index_select(0, unique))  # (u, kvh, d) each
        hk = head % kvh
        self.traffic.recomputed += unique.numel()
        self.traffic.recompute_saved_bytes += 2 * head.numel() * sum(
            math.prod(s[3:]) * dt.itemsize for s, dt in self._home_shapes())
        out = k[inverse, hk], v[inverse, hk]
        self.traffic.recompute_s += time.perf_counter() - t0
        return out


@dataclass
class _Ahead:
    rows: Tensor  # flat rows fetched: the recent run's, then the picks'
    run: int  # how many are the recent run's
    copies: list[tuple[list[Tensor], list[Handle]]]  # TokenTieredKV._fetch's buffers and their copies
    landed: tuple[Tensor, Tensor] | None = None  # their K, V once waited on (and dequantized)
    keys: Tensor | None = None  # rows sorted, and where each came from: for lookups of other requests
    order: Tensor | None = None


def _parts(q: QTensor) -> list[Tensor]:
    return [q.data, q.scale, q.mn]
