"""Schedulable units: embedding, attention, MLP and output head, each with explicit weights.

A unit declares the weights it needs (`weight_shapes`, canonical names under `prefix`)
and computes `forward(w, x, state)` from a plain dict of tensors, so an executor can
load, offload and run the units one at a time. The whole model is the list from
`build_units`; `weight_shapes(cfg)` is the canonical flat state dict layout every
loader (HF directory, GGUF, dummy) produces.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from runner.model import greedy_head, kernels, ops as M
from runner.model.attention_kv import AttentionKV
from runner.model.config import Mlp, ModelConfig, Norm, Positions

Shapes = dict[str, tuple[int, ...]]

# Weights the units read only through `kernels.linear` (and `kernels.weight_rows`), so an all-resident
# model may hold them packed (`kernels.pack`) or int8 (`runner.model.int8`). The embedding's rows are
# indexed, never packed.
LINEAR_WEIGHTS = frozenset({"qkv_w", "o_w", "gate_up_w", "down_w", "fc1_w", "fc2_w", "lm_w"})


def norm_shapes(cfg: ModelConfig) -> Shapes:
    """The weights of one norm (`ln_w`, and `ln_b` for a LayerNorm) over the hidden size."""
    if cfg.arch.norm is Norm.LAYER:
        return {"ln_w": (cfg.hidden_size,), "ln_b": (cfg.hidden_size,)}
    return {"ln_w": (cfg.hidden_size,)}


def norm(cfg: ModelConfig, w: dict[str, Tensor], x: Tensor) -> Tensor:
    """The norm `norm_shapes` declares, applied to x (..., h)."""
    if cfg.arch.norm is Norm.RMS:
        return M.rms_norm(x, w["ln_w"], cfg.norm_eps)
    return M.layer_norm(x, w["ln_w"], w["ln_b"], cfg.norm_eps)


@dataclass
class ForwardState:
    """Per-call inputs shared by all units of one forward pass over a batch."""
    positions: Tensor  # (b, s) absolute position of each new token
    start: int  # position of the first new token (all rows share it: prompts are left-padded)
    kv: AttentionKV  # runner.kv.store.KVStore
    rows: slice = dataclasses.field(default_factory=lambda: slice(None))  # batch rows this prefill call runs (prefill goes in row groups)
    prefill_mask: Tensor | None = None  # (b, 1, s, s) bool, None when no row is padded
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin gathered at positions: (b, 1, s, d)
    rope_table: tuple[Tensor, Tensor] | None = None  # the whole cos, sin tables (max_len, d): recomputing old K
    # The caller takes only each row's argmax: the head returns those token ids (b,), not logits
    # (through its bf16 screen where it has one: runner/model/greedy_head.py).
    greedy: bool = False


class Unit:
    prefix: str

    def weight_shapes(self) -> Shapes:
        raise NotImplementedError

    def forward(self, w: dict[str, Tensor], x: Tensor, state: ForwardState) -> Tensor:
        raise NotImplementedError


class Embedding(Unit):
    def __init__(self, cfg: ModelConfig):
        self.cfg, self.prefix = cfg, "embed"

    def weight_shapes(self) -> Shapes:
        c = self.cfg
        shapes: Shapes = {"tok_w": (c.vocab_size, c.embed_dim)}
        if c.arch.positions is Positions.LEARNED:
            shapes["pos_w"] = (c.max_seq_len + c.arch.pos_offset, c.hidden_size)
        if c.word_embed_proj_dim:
            shapes["proj_in_w"] = (c.hidden_size, c.embed_dim)
        return shapes

    def forward(self, w: dict[str, Tensor], ids: Tensor, state: ForwardState) -> Tensor:
        x = w["tok_w"][ids]  # (b, s, e)
        if "proj_in_w" in w:
            x = torch.matmul(x, w["proj_in_w"].t())  # (b, s, h)
        if self.cfg.arch.positions is Positions.LEARNED:
            x = x + w["pos_w"][state.positions.clamp(min=0) + self.cfg.arch.pos_offset]
        return x


class Attention(Unit):
    def __init__(self, cfg: ModelConfig, layer: int):
        self.cfg, self.layer, self.prefix = cfg, layer, f"layers.{layer}.attn"

    def weight_shapes(self) -> Shapes:
        c = self.cfg
        qkv_out = c.hidden_size + 2 * c.kv_dim
        ln = norm_shapes(c)
        # The order is the offload split's and the staging offsets' (runner.offload.scheduled): biases last.
        shapes: Shapes = {"ln_w": ln.pop("ln_w"), "qkv_w": (qkv_out, c.hidden_size),
                          "o_w": (c.hidden_size, c.hidden_size), **ln}
        if c.arch.qkv_bias:
            shapes["qkv_b"] = (qkv_out,)
        if c.arch.out_bias:
            shapes["o_b"] = (c.hidden_size,)
        return shapes

    def forward(self, w: dict[str, Tensor], h: Tensor, state: ForwardState) -> Tensor:
        c = self.cfg
        pre_ln = c.arch.norm_before
        if state.kv.wants_inputs:  # ALISA phase III: keep h, and how to get K/V back from it
            state.kv.observe_inputs(self.layer, h, state.positions, state.start,
                                    functools.partial(self.project_kv, w, state.rope_table))
        x = norm(c, w, h) if pre_ln else h
        qkv = kernels.linear(x, w["qkv_w"], w.get("qkv_b"))  # (b, s, h + 2*kv_dim)
        qk, v = qkv.split([c.hidden_size + c.kv_dim, c.kv_dim], dim=-1)
        qk = M.split_heads(qk, c.num_heads + c.num_kv_heads)  # (b, nh + kvh, s, d)
        if state.rope is not None:
            qk = M.apply_rope(qk, *state.rope)  # q and k rotated together: half the small ops
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
        v = M.split_heads(v, c.num_kv_heads)
        if state.start == 0:
            out = state.kv.prefill(self.layer, state.rows, q, k, v, state.prefill_mask)
        else:
            out = state.kv.decode(self.layer, q, k, v)
        h = kernels.linear(M.merge_heads(out), w["o_w"], w.get("o_b"), residual=h)  # h + o(out)
        return h if pre_ln else norm(c, w, h)

    def project_kv(self, w: dict[str, Tensor], rope: tuple[Tensor, Tensor] | None, h: Tensor,
                   positions: Tensor) -> tuple[Tensor, Tensor]:
        """K, V (r, kvh, d) of tokens from their layer inputs h (r, hidden) at `positions` (r,): the
        same norm, projection rows and rotary as `forward`, for K/V deleted from the cache."""
        c = self.cfg
        x = norm(c, w, h) if c.arch.norm_before else h
        bias = w.get("qkv_b")
        kv_w = kernels.weight_rows(w["qkv_w"], slice(c.hidden_size, None))  # recompute only: a packed weight is copied out
        kv = kernels.linear(x, kv_w, None if bias is None else bias[c.hidden_size:])
        k, v = kv.view(-1, 2, c.num_kv_heads, c.head_dim).unbind(1)  # (r, kvh, d) each
        if rope is not None:
            cos, sin = rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1)  # (r, 1, d)
            k = M.apply_rope(k, cos, sin)
        return k, v


class MLP(Unit):
    def __init__(self, cfg: ModelConfig, layer: int):
        self.cfg, self.layer, self.prefix = cfg, layer, f"layers.{layer}.mlp"

    def weight_shapes(self) -> Shapes:
        c = self.cfg
        h, f = c.hidden_size, c.intermediate_size
        if c.arch.mlp is Mlp.SWIGLU:
            return {**norm_shapes(c), "gate_up_w": (2 * f, h), "down_w": (h, f)}
        return {**norm_shapes(c), "fc1_w": (f, h), "fc1_b": (f,), "fc2_w": (h, f), "fc2_b": (h,)}

    def forward(self, w: dict[str, Tensor], h: Tensor, state: ForwardState) -> Tensor:
        c = self.cfg
        if c.arch.norm_before:
            return self._mlp(w, norm(c, w, h), h)
        return norm(c, w, self._mlp(w, h, h))

    def _mlp(self, w: dict[str, Tensor], x: Tensor, residual: Tensor) -> Tensor:
        """residual + the MLP of x: (b, s, h)."""
        if self.cfg.arch.mlp is Mlp.SWIGLU:
            return M.swiglu_mlp(x, w["gate_up_w"], w["down_w"], residual)  # (b, s, h)
        return M.relu_mlp(x, w["fc1_w"], w["fc1_b"], w["fc2_w"], w["fc2_b"], residual)  # (b, s, h)


class Head(Unit):
    """Final norm (+ opt-350m's project_out) and the LM head, applied to the last position only:
    logits (b, v), or with `state.greedy` each row's argmax token (b,)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.prefix = cfg, "head"

    def weight_shapes(self) -> Shapes:
        c = self.cfg
        shapes: Shapes = {"lm_w": (c.vocab_size, c.embed_dim)}
        if c.arch.norm_before:  # a pre-LN stack ends with a norm; a post-LN one has just applied it
            shapes.update(norm_shapes(c))
        if c.word_embed_proj_dim:
            shapes["proj_out_w"] = (c.embed_dim, c.hidden_size)
        return shapes

    def forward(self, w: dict[str, Tensor], h: Tensor, state: ForwardState) -> Tensor:
        x = h[:, -1]  # (b, h): prompts are left-padded, so the last column is every row's newest token
        if self.cfg.arch.norm_before:
            x = norm(self.cfg, w, x)
        if "proj_out_w" in w:
            x = torch.matmul(x, w["proj_out_w"].t())
        if state.greedy:
            return greedy_head.greedy_tokens(x, w["lm_w"], w.get(greedy_head.SCREEN), w.get(greedy_head.NORMS))  # (b,)
        return M.lm_head(x, w["lm_w"])  # (b, v)


def build_units(cfg: ModelConfig) -> list[Unit]:
    units: list[Unit] = [Embedding(cfg)]
    for i in range(cfg.num_layers):
        units += [Attention(cfg, i), MLP(cfg, i)]
    return units + [Head(cfg)]


def weight_shapes(cfg: ModelConfig) -> Shapes:
    """Canonical flat names ("layers.3.attn.qkv_w") and shapes of every weight of the model."""
    return {f"{u.prefix}.{k}": s for u in build_units(cfg) for k, s in u.weight_shapes().items()}


def matrix_params(shapes: Shapes) -> int:
    """Elements of the matrices among `shapes` (norm weights and biases, the vectors, left out)."""
    return sum(math.prod(s) for s in shapes.values() if len(s) == 2)


def num_params(cfg: ModelConfig) -> int:
    """The model's parameter count as the plain engine holds it: its matrices, a tied lm head once."""
    shapes = weight_shapes(cfg)
    return matrix_params(shapes) - (math.prod(shapes["head.lm_w"]) if cfg.tie_embeddings else 0)
