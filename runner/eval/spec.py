"""The job's `eval` section: an accuracy grid (perplexity or multiple choice) over KV policies.

A job with an `eval` section runs no generation: for every grid point (dense once per bits, then
policy x sparsity x bits, plus `extra` kv mappings) it measures model quality with that KV policy
and appends rows to `accuracy.csv` (see `runner.run_eval`). Errors name the dotted key, e.g.
`eval.sparsities[1]: must be in [0, 1), got 1.5`.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from runner.kv.spec import KVMode, KVSpec
from runner.spec import JobError, _at_least, _bad, _build, _freeze, _Spec


class EvalTask(str, enum.Enum):
    PERPLEXITY = "perplexity"  # text files: teacher-forced NLL of every decoded token
    MC = "mc"  # BIG-bench style JSONL: argmax of per-choice log-likelihood


class Metric(str, enum.Enum):
    PERPLEXITY = "perplexity"
    ACC = "acc"  # argmax of the summed log-likelihood
    ACC_NORM = "acc_norm"  # argmax of log-likelihood per character of the choice (lm-eval's acc_norm)


# Keys that mean something for one task only; setting one for the other task is an error.
_TASK_ONLY = {**dict.fromkeys(("context_len", "prefill_len", "windows"), EvalTask.PERPLEXITY),
              **dict.fromkeys(("limit", "shots", "decode_context", "seed", "list_choices"), EvalTask.MC)}
# A KV mapping's budget keys: an `extra` without one is swept over `sparsities`.
_BUDGET_KEYS = ("sparsity", "budget_tokens")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec(_Spec):
    _section = "eval"
    task: EvalTask
    data: tuple[str, ...]  # perplexity: text files, pooled; mc: JSONL task files, one result each
    context_len: int | None = None  # perplexity: tokens per window; default 2048 (the ALISA paper's)
    prefill_len: int | None = None  # perplexity: dense prefix of each window; default context_len // 2
    windows: int | None = None  # perplexity: windows scored, spread over the text (default 8)
    limit: int | None = None  # mc: first N questions of each task file (default: all)
    shots: int = 0  # mc: k-shot examples from the same file (fixed seed), the question excluded
    decode_context: int = 0  # mc: last N context tokens also fed one at a time, policy active
    list_choices: bool = False  # mc: list the choices under each question (BIG-bench style)
    seed: int = 0  # mc: k-shot draw and choice order
    batch_size: int = 8  # perplexity: windows per batch; mc: questions per batch (x choices rows)
    policies: tuple[str, ...] = ()
    sparsities: tuple[float, ...] = ()
    bits: tuple[int, ...] = (16,)
    mode: KVMode = KVMode.RETAIN
    extra: tuple = ()  # kv mappings, e.g. {policy: swa, score: decay}; stored as sorted (key, value) pairs

    def __post_init__(self) -> None:
        if not isinstance(self.extra, (list, tuple)):
            raise _bad("eval.extra", f"must be a list of kv mappings, got {self.extra!r}")
        object.__setattr__(self, "extra", tuple(_pairs(m, f"eval.extra[{i}]") for i, m in enumerate(self.extra)))
        super().__post_init__()

    def _validate(self) -> None:
        if not self.data:
            raise _bad("eval.data", "must list at least one file")
        ppl = self.task is EvalTask.PERPLEXITY
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, task in _TASK_ONLY.items():
            if (task is EvalTask.PERPLEXITY) != ppl and self.values()[name] != defaults[name]:
                raise _bad(f"eval.{name}", f"only used with task: {task.value}")
        if ppl:
            if self.context_len is None:
                object.__setattr__(self, "context_len", 2048)
            _at_least(self, "context_len", 2)
            if self.prefill_len is None:
                object.__setattr__(self, "prefill_len", self.context_len // 2)
            if self.windows is None:
                object.__setattr__(self, "windows", 8)
            _at_least(self, "prefill_len", 1)
            _at_least(self, "windows", 1)
            if self.prefill_len >= self.context_len:
                raise _bad("eval.prefill_len", f"must be < context_len ({self.context_len}), got {self.prefill_len}")
        for name in ("limit", "shots", "decode_context", "batch_size"):
            _at_least(self, name, 1 if name in ("limit", "batch_size") else 0)
        if self.policies and not self.sparsities:
            raise _bad("eval.sparsities", "required when eval.policies lists policies")
        if not self.bits:
            raise _bad("eval.bits", "must list at least one of 16, 8, 4")
        self.grid()  # builds every kv point, so a bad policy or value fails at load time

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["extra"] = [dict(pairs) for pairs in self.extra]
        return d

    def grid(self) -> list[KVSpec]:
        """Every kv point, in run order: dense per bits, policy x sparsity x bits, then extras."""
        points = [_kv(dict(policy="dense", bits=b, mode=self.mode), f"eval.bits[{i}]") for i, b in enumerate(self.bits)]
        for p, policy in enumerate(self.policies):
            if policy == "dense":
                raise _bad(f"eval.policies[{p}]", "dense is always run (once per bits); list sparse policies only")
            for s, sparsity in enumerate(self.sparsities):
                for i, b in enumerate(self.bits):
                    d = dict(policy=policy, sparsity=sparsity, bits=b, mode=self.mode)
                    points.append(_kv(d, {"policy": f"eval.policies[{p}]", "sparsity": f"eval.sparsities[{s}]",
                                          "bits": f"eval.bits[{i}]"}))
        for e, pairs in enumerate(self.extra):
            points += self._extra_points(dict(pairs), f"eval.extra[{e}]")
        unique = list(dict.fromkeys(points))  # a listed extra may repeat a grid point: run it once
        return unique

    def _extra_points(self, given: dict, key: str) -> list[KVSpec]:
        budgets = [{}] if any(k in given for k in _BUDGET_KEYS) else [{"sparsity": s} for s in self.sparsities]
        if not budgets:
            raise _bad(f"{key}", "give sparsity or budget_tokens, or list eval.sparsities to sweep")
        bits = [{}] if "bits" in given else [{"bits": b} for b in self.bits]
        return [_kv({"mode": self.mode, **given, **budget, **bit}, key) for budget in budgets for bit in bits]


def _pairs(mapping: Any, key: str) -> tuple[tuple[str, Any], ...]:
    """A kv mapping as sorted (key, value) pairs, so the frozen spec stays hashable."""
    if isinstance(mapping, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in mapping):
        return mapping  # already converted (a spec rebuilt from another's fields)
    if not isinstance(mapping, Mapping) or not mapping:
        raise _bad(key, f"must be a non-empty kv mapping such as {{policy: swa, score: decay}}, got {mapping!r}")
    return tuple(sorted((str(k), _freeze(v)) for k, v in mapping.items()))


def _kv(d: dict, keys: str | dict[str, str]) -> KVSpec:
    """Build a KVSpec, renaming `kv.<key>` in errors to the eval key the value came from."""
    try:
        return _build(KVSpec, d)
    except JobError as e:
        kv_key = (e.key or "kv").removeprefix("kv.")
        where = keys.get(kv_key, "eval") if isinstance(keys, dict) else (
            keys if keys.startswith("eval.bits") else f"{keys}.{kv_key}")
        detail = str(e).split(": ", 1)[-1]
        raise JobError(f"{where}: {detail}", key=where) from None
