"""A quality budget met from an accuracy grid: `kv.max_ppl_increase` picks the job's sparsity and bits.

The grid is an eval job's accuracy.csv (runner/run_eval.py writes it): one perplexity per (policy,
sparsity, bits) point, beside the dense rows of the same model. A point's increase is its perplexity
over the dense fp-KV row (policy dense, 16 bits, every other kv setting default) of the same grid
setup (data, eval settings, dtype), minus one.

The rule: among the points of the job's policy within budget, the highest sparsity, then the fewest
bits. That is the point with the fewest KV bytes attended, stored and moved, which is what sparsity
and quantization are bought for; it is not always the fastest (on a compute-bound CPU dequantizing
INT8 can cost more than its bytes save), and the throughput comparison is the planner's afterwards.
Choosing by predicted throughput would tie the pick to one hardware profile; this rule gives every
machine the same KV settings for the same budget, so their throughputs compare at one quality.

Only a point measured with the job's other kv settings (mode, score, window, group size, ...) counts:
an ablation row of the grid (e.g. SWA with a decayed score) is not the job's policy.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # read only when a job has a quality budget: pandas costs a run ~50 MB of RSS
    import pandas as pd

from runner.kv.spec import KVSpec
from runner.spec import _bad

REPO = Path(__file__).resolve().parents[2]
# model name -> its committed perplexity grid (repository-relative): the default of kv.accuracy_grid
GRIDS: dict[str, str] = {"smollm2-135m": "results/eval/smollm2-austen-ppl/accuracy.csv"}
BUDGET_POLICY = "swa"  # searched when the job's kv.policy is dense (the section's default): ALISA's
REFERENCE_DTYPE = "float32"  # grid rows used when the job's dtype has none (relative increases carry over)
PERPLEXITY = "perplexity"  # the grid's metric a budget reads
DENSE = "dense"
# kv settings that do not change what a point measures, or that the budget itself picks
_NOT_MATCHED = frozenset({"policy", "sparsity", "bits", "profile", "max_ppl_increase", "accuracy_grid"})
# a point exactly at the budget meets it: ppl / dense - 1 carries float rounding of this order
_AT_BUDGET = 1e-9
# the columns that say which measurement setup a row belongs to: increases compare within one
_SETUP = ["data", "eval_config", "dtype"]


@dataclass(frozen=True, kw_only=True)
class GridPoint:
    policy: str
    sparsity: float
    bits: int
    perplexity: float
    increase: float  # relative to the dense fp-KV row: 0.021 = +2.1%

    def describe(self) -> str:
        return f"sparsity {self.sparsity:g} bits {self.bits} (+{self.increase:.2%})"


@dataclass(frozen=True, kw_only=True)
class QualityChoice:
    """What a budget picked, and the evidence: printed by run.py, recorded in the CSV rows."""
    budget: float
    grid: str  # the accuracy.csv read, as the job names it (or the registry's path)
    model: str
    dtype: str  # the grid rows' dtype
    tokens: str  # tokens scored per point
    dense: float  # the dense fp-KV perplexity the increases are relative to
    chosen: GridPoint
    next_over: GridPoint | None  # the least increase among sparser points over budget, if any

    def line(self) -> str:
        """One line: what was chosen, why, and what the next sparser point would have cost."""
        c = self.chosen
        text = (f"kv: {c.policy} sparsity {c.sparsity:g} bits {c.bits} chosen: perplexity +{c.increase:.2%} "
                f"<= {_percent(self.budget)} budget ({self.grid}, {self.model} {self.dtype}, {self.tokens} tokens, "
                f"dense {self.dense:g})")
        if self.next_over is not None:
            text += f"; {self.next_over.describe().replace(' (', ' was ').rstrip(')')}"
        return text

    def kv(self, kv: KVSpec) -> KVSpec:
        """`kv` with the chosen policy, sparsity and bits, its budget keys cleared (the choice records them)."""
        c = self.chosen
        return dataclasses.replace(kv, policy=c.policy, sparsity=c.sparsity, bits=c.bits, max_ppl_increase=None,
                                   accuracy_grid=None)


def _percent(fraction: float) -> str:
    """A budget as the user wrote it, in percent: 0.03 -> '3%'."""
    return f"{fraction * 100:g}%"


def grid_path(kv: KVSpec, model: str) -> tuple[str, Path]:
    """The grid a budget reads, as named and as a path: kv.accuracy_grid (relative to the working directory,
    as every job path is), else the model's committed one (relative to the repository, wherever the run starts)."""
    if kv.accuracy_grid is not None:
        return kv.accuracy_grid, Path(kv.accuracy_grid)
    if model not in GRIDS:
        raise _bad("kv.max_ppl_increase", f"no accuracy grid for model {model} (committed: {', '.join(GRIDS)}): "
                   "measure one with an eval job (task: perplexity, e.g. jobs/eval/smollm2-austen-ppl.yaml) "
                   "and name its accuracy.csv in kv.accuracy_grid")
    return GRIDS[model], REPO / GRIDS[model]


def choose(kv: KVSpec, model: str, dtype: str | None) -> QualityChoice:
    """The point `kv.max_ppl_increase` picks for `model` (rows of `dtype` when the grid has them, else of
    REFERENCE_DTYPE); a one-line JobError naming the key when no point meets it."""
    name, path = grid_path(kv, model)
    rows = _setup_rows(_read(name, path, model), name, model, dtype)
    dense_row = rows[rows.kv_config.map(_config) == {"policy": DENSE}]
    if dense_row.empty:
        raise _bad("kv.accuracy_grid", f"{name} has no dense fp-KV perplexity row for {model} (policy dense, "
                   "bits 16) to measure increases against")
    dense = float(dense_row.value.iloc[0])
    policy = BUDGET_POLICY if kv.policy == DENSE else kv.policy
    points = [_point(r, dense) for r in rows.itertuples() if _is_candidate(r, policy, kv)]
    if not points:
        raise _bad("kv.max_ppl_increase", f"{name} has no {policy} perplexity points for {model} with the job's "
                   "other kv settings: add them to the eval job's grid")
    budget = kv.max_ppl_increase
    within = [p for p in points if p.increase <= budget + _AT_BUDGET]
    if not within:
        best = min(points, key=lambda p: p.increase)
        raise _bad("kv.max_ppl_increase", f"no {policy} point of {name} is within +{_percent(budget)} of dense "
                   f"perplexity {dense:g} ({model}): the best, {best.describe()}; raise the budget or use another "
                   "kv.policy")
    chosen = max(within, key=lambda p: (p.sparsity, -p.bits))
    over = [p for p in points if p.sparsity > chosen.sparsity and p not in within]
    return QualityChoice(budget=budget, grid=name, model=model, dtype=str(rows.dtype.iloc[0]),
                         tokens=str(dense_row.tokens_scored.iloc[0]), dense=dense, chosen=chosen,
                         next_over=min(over, key=lambda p: p.increase) if over else None)


def _read(name: str, path: Path, model: str) -> pd.DataFrame:
    """The grid's perplexity rows of `model`, every column as text (commit hashes, configs stay as written)."""
    import pandas as pd
    try:
        grid = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise _bad("kv.accuracy_grid", f"cannot read {name}: {e}") from None
    missing = {"model", "metric", "kv_policy", "sparsity", "bits", "value", "kv_config", "tokens_scored",
               *_SETUP} - set(grid.columns)
    if missing:
        raise _bad("kv.accuracy_grid", f"{name} is not an eval job's accuracy.csv (no {', '.join(sorted(missing))})")
    rows = grid[(grid.model == model) & (grid.metric == PERPLEXITY)]
    if rows.empty:
        raise _bad("kv.accuracy_grid", f"{name} has no perplexity rows for model {model}: measure them with an "
                   "eval job (task: perplexity)")
    return rows


def _setup_rows(rows: pd.DataFrame, name: str, model: str, dtype: str | None) -> pd.DataFrame:
    """The rows of one measurement setup: the job's dtype when the grid has it, else the reference."""
    dtypes = set(rows.dtype)
    pick = dtype if dtype in dtypes else REFERENCE_DTYPE
    if pick not in dtypes:
        raise _bad("kv.accuracy_grid", f"{name} has perplexity rows for {model} in {', '.join(sorted(dtypes))}, "
                   f"not in {dtype or 'the job dtype'} or {REFERENCE_DTYPE}")
    rows = rows[rows.dtype == pick]
    setups = rows.groupby(_SETUP).ngroups
    if setups != 1:
        raise _bad("kv.accuracy_grid", f"{name} holds {setups} perplexity setups (data, eval settings) for "
                   f"{model} {pick}; a budget needs one: keep one eval job's rows per file")
    return rows


def _config(text: str) -> dict:
    return json.loads(text)


def _is_candidate(row, policy: str, kv: KVSpec) -> bool:
    """A sparse point of `policy` measured with the job's other kv settings (non-default ones, as the grid's
    kv_config records them)."""
    if row.kv_policy != policy or not row.sparsity or float(row.sparsity) <= 0:
        return False
    defaults = KVSpec().to_dict()
    own = {k: v for k, v in kv.to_dict().items() if k not in _NOT_MATCHED and v != defaults[k]}
    measured = {k: v for k, v in _config(row.kv_config).items() if k not in _NOT_MATCHED}
    return own == measured


def _point(row, dense: float) -> GridPoint:
    ppl = float(row.value)
    if not math.isfinite(ppl):
        raise _bad("kv.accuracy_grid", f"perplexity {row.value!r} of {row.kv_config} is not a finite number")
    return GridPoint(policy=row.kv_policy, sparsity=float(row.sparsity), bits=int(row.bits), perplexity=ppl,
                     increase=ppl / dense - 1)
