"""The bytes each tier must hold for the block executor's plan, as pure functions of the model,
policy and batch shape: the executor checks its budgets with them before it allocates anything,
and the cost model (`runner.plan.cost_model`) predicts peak memory with the same functions, so a plan
the search finds fits exactly when the executor would accept it.
"""
from __future__ import annotations

import functools

import torch

from runner.model import ops as M
from runner.model.config import ModelConfig, Positions
from runner.offload.placement import KVPlacer
from runner.kv.store import KVSettings
from runner.model.layers import build_units
from runner.memory.tiers import Tier
from runner.offload.scheduled import plan_bytes
from runner.offload.policy import OffloadPolicy

SLOTS = 2  # weight staging slots: the running layer's and the prefetched one's (double buffering)
Need = dict[Tier, dict[str, int]]  # bytes per tier, by the part of the plan that needs them


def weight_need(cfg: ModelConfig, policy: OffloadPolicy, dtype: torch.dtype) -> tuple[Need, int]:
    """Weights in their home tiers, the staging slots and the rotary tables; also the staging slot
    size (elements): the largest unit's bytes that arrive from off the gpu."""
    parts, staging = _weight_need(cfg, policy.w_gpu_percent, policy.w_cpu_percent, policy.compress_weight, dtype)
    need: Need = {t: {} for t in Tier}
    for tier, label, n in parts:
        need[tier][label] = n
    return need, staging


@functools.lru_cache(maxsize=4096)  # the plan search asks again and again for the same placements
def _weight_need(cfg: ModelConfig, w_gpu: float, w_cpu: float, compress: bool, dtype: torch.dtype
                 ) -> tuple[tuple[tuple[Tier, str, int], ...], int]:
    policy = OffloadPolicy(w_gpu_percent=w_gpu, w_cpu_percent=w_cpu, compress_weight=compress)
    need: Need = {t: {} for t in Tier}
    staging = 0
    seen: dict[tuple, tuple[dict[Tier, int], int]] = {}  # the layers repeat a few unit shapes
    for u in build_units(cfg):
        shapes = u.weight_shapes()
        key = tuple(shapes.items())
        if key not in seen:
            seen[key] = plan_bytes(shapes, policy, dtype)
        per_tier, numel = seen[key]
        for t, n in per_tier.items():
            need[t][f"{t.value} weights"] = need[t].get(f"{t.value} weights", 0) + n
        staging = max(staging, numel)
    need[Tier.GPU][f"{SLOTS} weight staging slots"] = SLOTS * staging * dtype.itemsize
    if cfg.arch.positions is Positions.ROPE:
        need[Tier.GPU]["rotary tables"] = 2 * cfg.max_seq_len * cfg.head_dim * dtype.itemsize
    return tuple((t, label, n) for t in Tier for label, n in need[t].items()), staging


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    if cfg.arch.positions is not Positions.ROPE:
        return None
    return M.rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, dtype, device)


def block_need(cfg: ModelConfig, placer: KVPlacer, act_tier: Tier, shapes: list[tuple[int, int]], max_new: int,
               dtype: torch.dtype) -> Need:
    """A block's KV (every tier), hidden states and logits, for GPU batches of (rows, max_len)."""
    itemsize = dtype.itemsize
    need = placer.plan(shapes, max_new)
    acts = activation_elems(cfg, shapes, max_new)
    logits = [rows * cfg.vocab_size * itemsize for rows, _ in shapes]
    if act_tier is Tier.GPU:
        for k, n in enumerate(acts):
            need[Tier.GPU][f"activations of GPU batch {k}"] = n * itemsize + logits[k]
    else:  # homes on the act tier; on the gpu the running and the prefetched batch's, and the logits
        for k, n in enumerate(acts):
            need[act_tier][f"activations of GPU batch {k}"] = n * itemsize
        need[Tier.GPU]["activations of 2 GPU batches"] = 2 * max(acts) * itemsize
        need[Tier.GPU]["logits"] = sum(logits)
    return need


def activation_elems(cfg: ModelConfig, shapes: list[tuple[int, int]], max_new: int) -> list[int]:
    """Elements of each GPU batch's hidden states at their largest: the prompt's pass."""
    return [rows * (length - max_new) * max(cfg.hidden_size, cfg.embed_dim) for rows, length in shapes]


def plan_need(cfg: ModelConfig, policy: OffloadPolicy, kv: KVSettings, dtype: torch.dtype, *, gpu_batch_size: int,
              num_gpu_batches: int, prompt_len: int, gen_len: int) -> dict[Tier, int]:
    """Peak bytes per tier of the executor's run of full blocks of equal-length prompts: `block_need`
    summed without its part names (for k equal GPU batches, each per-batch part counts k times)."""
    weights, _ = weight_need(cfg, policy, dtype)
    placer = KVPlacer(cfg, policy, kv, None, None, dtype)  # planning only: no memory, no copies
    k, n = num_gpu_batches, prompt_len + gen_len
    out = placer.plan_totals([(gpu_batch_size, n)] * k, gen_len)
    acts = activation_elems(cfg, [(gpu_batch_size, n)], gen_len)[0] * dtype.itemsize
    logits = gpu_batch_size * cfg.vocab_size * dtype.itemsize
    if policy.act_tier is Tier.GPU:
        out[Tier.GPU] += k * (acts + logits)
    else:
        out[policy.act_tier] += k * acts
        out[Tier.GPU] += 2 * acts + k * logits
    return {t: sum(weights[t].values()) + out[t] for t in Tier}
