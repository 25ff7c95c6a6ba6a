"""A causal LM on one device: the units of `layers.py` run in order over a padded batch.

This is the plain (all-resident) execution path; the block-scheduled executor runs the
same units with weights and KV moved between tiers.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from runner.model import greedy_head, int8, kernels, ops as M
from runner.model.config import ModelConfig, Positions
from runner.kv.spec import KVSettings
from runner.kv.store import KVStore
from runner.model.layers import LINEAR_WEIGHTS, ForwardState, Unit, build_units


class Pack(enum.Enum):
    """Which linear weights an all-resident LM packs for oneDNN (`kernels.pack`)."""
    NONE = "none"
    UNSHARED = "unshared"  # all but a weight shared with another unit (a tied head)
    ALL = "all"  # the tied head too, as a second copy


def screen_copy_bytes(cfg: ModelConfig, dtype: torch.dtype, pack: Pack) -> int:
    """Bytes the greedy head's bf16 screen adds (`greedy_head.build_screen`): none where the head is
    already a plain bf16 matrix (it is its own screen), else a bf16 copy of it."""
    return 0 if dtype == torch.bfloat16 and pack is Pack.NONE else cfg.vocab_size * cfg.embed_dim * 2


class LM:
    def __init__(self, cfg: ModelConfig, weights: dict[str, Tensor], device: torch.device, dtype: torch.dtype,
                 pack: Pack = Pack.UNSHARED, release: bool = False, screen: bool | None = None,
                 weight_bits: int | None = None):
        """`release`: drop each weight the LM packs from `weights` once its packed copy exists, so
        packing holds one weight twice at a time, not the model (the caller's dict is consumed).
        `screen`: give an fp32 or bf16 model's head a bf16 screen for greedy decoding (`runner.model.greedy_head`;
        a bf16 copy of the head, 57 MB on SmolLM2): None where `kernels.bf16_screen` says it pays,
        True always (correct anywhere, slow without bf16 dot products), False never. A screened
        head's fp32 matrix stays plain (the screen indexes its rows), so an untied head's full
        logits (sampling, scoring) lose packing's speed-up.
        `weight_bits`: 8 quantizes the layers' linear weights to int8 (`_quantize`); None keeps `dtype`."""
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.units: list[Unit] = build_units(cfg)
        self.unit_weights = [_weights_of(u, weights) for u in self.units]
        if screen is None:
            screen = kernels.bf16_screen(device, dtype)
        if screen and dtype in (torch.float32, torch.bfloat16):  # the screen's bound is for fp32 logits
            head = self.unit_weights[-1]  # build_units puts the head last
            head.update(greedy_head.build_screen(head["lm_w"], pack=pack is not Pack.NONE))
        if weight_bits == 8:
            self._quantize(release=weights if release else None)
        elif weight_bits is not None:
            raise ValueError(f"weight_bits: 8 or None, got {weight_bits}")
        if pack is not Pack.NONE:
            self._pack(shared=pack is Pack.ALL, release=weights if release else None)
        self.rope = None
        if cfg.arch.positions is Positions.ROPE:
            self.rope = M.rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, dtype, device)

    def _quantize(self, release: dict[str, Tensor] | None) -> None:
        """Hold every unit's linear weights but the head's as int8 (`runner.model.int8`). The head stays in
        the model dtype: its greedy screen (`runner.model.greedy_head`) bounds fp32-vs-bf16 logits, and a
        quantized head could pick another token than fp32's. A tied head is the embedding's matrix,
        which stays in the model dtype anyway."""
        for unit, w in zip(self.units, self.unit_weights):
            for key in sorted(LINEAR_WEIGHTS & w.keys() - {"lm_w"}):
                if not isinstance(w[key], int8.Int8Weight):  # a GGUF's Q8_0 comes as stored
                    w[key] = int8.quantize(w[key])
                if release is not None:
                    release.pop(f"{unit.prefix}.{key}", None)

    def _pack(self, shared: bool, release: dict[str, Tensor] | None) -> None:
        """Hold the linear weights in oneDNN's packed layout (`kernels.pack`; CPU fp32, and bf16 where native). The
        plain copies stay resident while the caller holds them (see `release`). A weight another
        unit also reads (the head tied to the embedding) stays plain unless `shared`: its packed
        copy would add its whole size (113 MB on SmolLM2) to memory."""
        uses: dict[int, int] = {}  # by storage: a tied head may be another tensor over the same memory
        for w in self.unit_weights:
            for t in w.values():
                if isinstance(t, Tensor) and not t.is_mkldnn:  # an opaque tensor (the head's packed screen) shares with nothing
                    uses[_storage(t)] = uses.get(_storage(t), 0) + 1
        for unit, w in zip(self.units, self.unit_weights):
            for key in sorted(LINEAR_WEIGHTS & w.keys()):
                if (key == "lm_w" and greedy_head.SCREEN in w) or isinstance(w[key], int8.Int8Weight):
                    continue  # the screen's candidates index the head's rows: it stays a plain matrix
                if shared or uses[_storage(w[key])] == 1:
                    w[key] = kernels.pack(w[key])
                    if release is not None and w[key].is_mkldnn:
                        release.pop(f"{unit.prefix}.{key}", None)

    def run(self, ids: Tensor, state: ForwardState) -> Tensor:
        """ids: (b, s) -> logits of the last column (b, v), or with `state.greedy` its argmax tokens (b,)."""
        set_rope(state, self.rope)
        x = ids
        for unit, w in zip(self.units, self.unit_weights):
            x = unit.forward(w, x, state)
        return x


def set_rope(state: ForwardState, rope: tuple[Tensor, Tensor] | None) -> None:
    """Gather the rotary tables (cos, sin) at the state's positions once per forward pass (LLaMA only)."""
    if rope is not None:
        state.rope_table = rope
        cos, sin = rope
        state.rope = (cos[state.positions].unsqueeze(1), sin[state.positions].unsqueeze(1))  # (b, 1, s, d)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _weights_of(unit: Unit, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    missing = [k for k in unit.weight_shapes() if f"{unit.prefix}.{k}" not in weights]
    if missing:
        raise KeyError(f"weights missing for {unit.prefix}: {missing}")
    return {k: weights[f"{unit.prefix}.{k}"] for k in unit.weight_shapes()}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-align prompts in one (b, s) id tensor; returns (ids, valid) with valid False on padding.

    Left padding puts every row's newest token in the last column, so decode steps share one
    cache slot and the head reads one column.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    return ids, valid


# Prompt tokens per prefill group. Running a big batch's prompts in groups keeps each
# layer's activations (tokens x 3072 floats in the MLP) near cache size: at batch 64 x 512
# the whole-batch prefill ran ~25% slower per token than batch 1 on the 2-core CPU.
PREFILL_GROUP_TOKENS = 2048


class Batch:
    """A left-padded batch of prompts with its KV store, advanced one step at a time."""

    def __init__(self, lm: LM, prompts: list[list[int]], max_new_tokens: int, kv: KVSettings | None = None,
                 make_cache: Callable[[int, int], Any] | None = None, greedy: bool = False):
        """`greedy`: prefill and decode return each row's greedy next token (b,), not logits
        (`ForwardState.greedy`)."""
        self.lm, self.greedy = lm, greedy
        dev = lm.device
        ids, valid = left_pad(prompts, pad_id=0)
        b, s = ids.shape
        self.ids, self.prompt_width = ids.to(dev), s
        key_valid = torch.ones((b, s + max_new_tokens), dtype=torch.bool, device=dev)
        key_valid[:, :s] = valid.to(dev)
        self.prompt_valid = key_valid[:, :s]
        self.positions = (valid.long().cumsum(-1) - 1).clamp(min=0).to(dev)  # (b, s)
        self.kv = KVStore(lm.cfg, kv or KVSettings(), key_valid, lm.dtype, dev, make_cache)

    @property
    def length(self) -> int:
        return self.kv.length

    def prefill(self) -> Tensor:
        """Run the prompts, a few rows at a time, and return the last column's logits (b, v)
        (greedy: the next tokens (b,))."""
        rows_per_group = max(1, PREFILL_GROUP_TOKENS // self.prompt_width)
        logits = [self._prefill_rows(slice(r, r + rows_per_group))
                  for r in range(0, self.ids.shape[0], rows_per_group)]
        self.kv.length = self.prompt_width
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _prefill_rows(self, rows: slice) -> Tensor:
        return self.lm.run(self.ids[rows], self.prefill_state(rows))

    def prefill_state(self, rows: slice) -> ForwardState:
        """The forward state of a prefill pass over prompt rows `rows` (the executor runs it unit by unit)."""
        s, valid = self.prompt_width, self.prompt_valid[rows]
        mask = None
        if not bool(valid.all()):
            causal = torch.ones((s, s), dtype=torch.bool, device=self.lm.device).tril()
            eye = torch.eye(s, dtype=torch.bool, device=self.lm.device)
            # Padding queries may attend to themselves so no softmax row is empty (NaN-free).
            mask = (causal & valid[:, None, None, :]) | eye  # (rows, 1, s, s)
        return ForwardState(positions=self.positions[rows], start=0, kv=self.kv, rows=rows, prefill_mask=mask,
                            greedy=self.greedy)

    def select_rows(self, index: Tensor) -> "Batch":
        """A new batch of rows `index` (b',) of this one after prefill, sharing nothing mutable;
        rows may repeat (fork a prefilled context to score several continuations)."""
        out = Batch.__new__(Batch)
        out.lm, out.prompt_width, out.greedy = self.lm, self.prompt_width, self.greedy
        out.ids, out.prompt_valid, out.positions = self.ids[index], self.prompt_valid[index], self.positions[index]
        out.kv = self.kv.select_rows(index)
        return out

    def decode(self, tokens: Tensor) -> Tensor:
        """tokens: (b,) sampled last step -> logits (b, v) for the next one (greedy: its tokens (b,))."""
        logits = self.lm.run(tokens[:, None], self.decode_state())
        self.kv.length += 1
        return logits

    def decode_state(self) -> ForwardState:
        """Advance to the next position and return its forward state; the caller runs every unit and
        then adds 1 to `kv.length` (the store reads the length of the step being decoded)."""
        self.positions = self.positions[:, -1:] + 1  # (b, 1)
        return ForwardState(positions=self.positions, start=self.kv.length, kv=self.kv, greedy=self.greedy)
