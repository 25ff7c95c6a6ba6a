"""The job's `kv` section: which policy selects the KV each step attends to, its budget,
the storage mode (retain / evict) and the KV storage precision (16 / 8 / 4 bits)."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from policies import KVPolicy, get_policy
from policies.dense import Dense
from runner.spec import _bad, _Spec


class KVMode(str, enum.Enum):
    RETAIN = "retain"  # all KV kept; attention over the selection (ALISA's accuracy setting)
    EVICT = "evict"  # unselected KV freed for good: memory bounded by the budget (H2O real drop)


class QuantAxis(str, enum.Enum):
    HIDDEN = "hidden"  # groups along each token's head dim (FlexGen)
    CHANNEL = "channel"  # per channel, groups of consecutive tokens (ALISA's "channel-wise")


@dataclass(frozen=True, kw_only=True)
class KVSettings:
    """A batch's KV settings at run time (what `KVSpec.settings` builds, and what `KVStore` reads)."""
    policy: KVPolicy = field(default_factory=Dense)
    mode: KVMode = KVMode.RETAIN
    bits: int = 16  # 16 = the compute dtype, unquantized
    group_size: int = 64
    quant_axis: QuantAxis = QuantAxis.HIDDEN
    profile: bool = False  # time the decode phases (store/score/select/gather/attend) per step
    pick_buffer: bool = True  # keep picks packed per layer across steps (the executor's offload.pick_buffer)


# kv keys that are parameters of the policy object rather than of storage
_POLICY_KEYS = ("sparsity", "budget_tokens", "window", "score", "sinks", "per_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVSpec(_Spec):
    _section = "kv"
    policy: str = "dense"
    sparsity: float | None = None  # fraction of KV not attended: caching ratio r = 1 - sparsity
    budget_tokens: int | None = None  # or a fixed number of tokens attended
    mode: KVMode = KVMode.RETAIN
    score: str | None = None  # swa: window (default) | decay
    window: int | None = None  # swa: scoring window in decode steps (default k, the paper's)
    sinks: int | None = None  # streaming: attention-sink tokens kept (default 4)
    per_head: bool | None = None  # swa: select per kv head (ablation; the paper reduces over heads)
    bits: int = 16  # 16 = unquantized (the compute dtype); 8 or 4 = group-wise min/max integers
    group_size: int = 64
    quant_axis: QuantAxis = QuantAxis.HIDDEN
    profile: bool = False  # time decode phases into the CSV's kv_*_s columns (syncs CUDA per lap)
    # A quality budget: the largest relative perplexity increase over the model's dense fp-KV row that
    # the job accepts; sparsity and bits are then picked from an accuracy grid (runner.plan.quality).
    max_ppl_increase: float | None = None
    accuracy_grid: str | None = None  # that grid's accuracy.csv (default: the model's committed one)

    def _validate(self) -> None:
        self._check_budget()
        if self.bits not in (16, 8, 4):
            raise _bad("kv.bits", f"must be 16, 8 or 4, got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise _bad("kv.group_size", f"must be an even integer >= 2, got {self.group_size}")
        if self.bits != 16 and self.quant_axis is QuantAxis.CHANNEL and self.mode is KVMode.EVICT:
            raise _bad("kv.quant_axis", "channel groups span tokens, so they cannot be compacted: "
                       "use quant_axis: hidden with mode: evict")
        self.make_policy()  # a bad policy name or parameter fails when the job loads

    def _check_budget(self) -> None:
        """A quality budget picks sparsity and bits itself, so a job that also states them is refused
        rather than silently overridden (bits 16, the default, cannot be told apart from unset)."""
        if self.max_ppl_increase is None:
            if self.accuracy_grid is not None:
                raise _bad("kv.accuracy_grid", "only used with kv.max_ppl_increase (the grid it picks from)")
            return
        if not 0 < self.max_ppl_increase <= 1:
            raise _bad("kv.max_ppl_increase", f"must be in (0, 1] (0.03 = perplexity at most 3% above dense), "
                       f"got {self.max_ppl_increase}")
        for key, value, unset in (("sparsity", self.sparsity, None), ("budget_tokens", self.budget_tokens, None),
                                  ("bits", self.bits, 16)):
            if value != unset:
                raise _bad(f"kv.{key}", "picked by kv.max_ppl_increase from the accuracy grid; remove one of them")

    @property
    def budget_pending(self) -> bool:
        """A quality budget whose sparsity and bits are not picked yet (runner.planner.resolve_quality)."""
        return self.max_ppl_increase is not None

    def make_policy(self):
        """The registered policy object this section describes."""
        values = self.values()
        params = {k: values[k] for k in _POLICY_KEYS if values[k] is not None}
        try:
            return get_policy(self.policy, **params)
        except ValueError as e:
            key = str(e).split(":", 1)[0]
            raise _bad(key if key.startswith("kv.") else "kv.policy", str(e).split(": ", 1)[-1]) from None

    def settings(self) -> KVSettings:
        """The runtime `KVSettings` for `runner.kv.store.KVStore`."""
        if self.budget_pending:  # a run or plan of the unresolved section would silently attend everything
            raise _bad("kv.max_ppl_increase", "not resolved yet: runner.planner.resolve_quality picks kv.sparsity "
                       "and kv.bits before a plan or run")
        return KVSettings(policy=self.make_policy(), mode=self.mode, bits=self.bits, group_size=self.group_size,
                          quant_axis=self.quant_axis, profile=self.profile)

    def label(self) -> str:
        """Short description for CSV rows, e.g. 'swa s=0.8 retain int8'."""
        parts = [self.policy]
        if self.sparsity is not None:
            parts.append(f"s={self.sparsity:g}")
        if self.budget_tokens is not None:
            parts.append(f"budget={self.budget_tokens}")
        if self.policy != "dense":
            parts.append(self.mode.value)
        if self.score is not None:
            parts.append(self.score)
        if self.window is not None:
            parts.append(f"w={self.window}")
        if self.per_head:
            parts.append("per-head")
        if self.bits != 16:
            parts.append(f"int{self.bits}")
        if self.max_ppl_increase is not None:
            parts.append(f"ppl<=+{self.max_ppl_increase:.1%}")
        return " ".join(parts)
