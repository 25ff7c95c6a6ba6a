"""Run an `eval` job's grid: one grid point at a time, each appended to accuracy.csv when done.

A point is (data, kv): for perplexity the data is all of `eval.data` pooled, for mc each task
file is its own point. Resume: points whose key (task, data, model, dtype, kv config, eval
settings) already has rows in accuracy.csv are skipped, so an interrupted grid loses at most the
point in progress. After the grid, accuracy.png is drawn from the rows of this grid's points.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from runner.eval.mc import MCDataError, build_prompts, load_questions, score_prompts
from runner.eval.perplexity import score_windows, text_windows
from runner.eval.plot import plot_accuracy
from runner.eval.spec import EvalSpec, EvalTask, Metric
from runner.job import JobSpec
from runner.kv.spec import KVSpec
from runner.engines.lm import LM
from runner.data.outputs import git_commit, weights_label
from runner.planner import resolve_dtype
from runner.run_job import RunError, resolve_device
from runner.model.weights import LoadedModel, load_model

ACCURACY_COLUMNS: tuple[str, ...] = (
    "job", "task", "data", "model", "dtype", "kv_policy", "kv_label", "sparsity", "budget_tokens", "bits",
    "mode", "score", "metric", "value", "tokens_scored", "questions", "context_len", "prefill_len", "windows",
    "shots", "decode_context", "seconds", "started_at", "git_commit", "kv_config", "eval_config",
)
# The columns that say what was measured; a row with the same values is the same point.
KEY_COLUMNS: tuple[str, ...] = ("task", "data", "model", "dtype", "kv_config", "eval_config")
# KVSpec fields shown in the label beyond KVSpec.label()'s own (policy, budget, mode, bits).
_LABEL_SKIP = {"policy", "sparsity", "budget_tokens", "mode", "bits"}


@dataclass(frozen=True, kw_only=True)
class Point:
    data: tuple[str, ...]
    kv: KVSpec


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    csv: Path
    png: Path
    computed: int  # points run now
    skipped: int  # points already in the CSV
    rows: list[dict[str, Any]]  # every row of this grid's points, in grid order


def kv_config(kv: KVSpec) -> str:
    """Canonical JSON of the policy and every non-default kv setting: the kv part of a point's key.
    Defaults are left out so a kv key added later (with a default) does not orphan existing rows."""
    defaults = KVSpec().to_dict()
    d = {k: v for k, v in kv.to_dict().items() if k == "policy" or v != defaults.get(k)}
    return json.dumps(d, sort_keys=True)


def kv_label(kv: KVSpec) -> str:
    """KVSpec.label() plus any other non-default setting, e.g. 'swa s=0.8 retain score=decay'."""
    defaults, label = KVSpec().to_dict(), kv.label()
    extra = [f"{k}={v}" for k, v in kv.to_dict().items()
             if k not in _LABEL_SKIP and v != defaults.get(k) and str(v) not in label.split()]
    return " ".join([label, *extra])


def eval_config(spec: EvalSpec) -> str:
    """The eval settings a value depends on (batch_size does not change what is measured)."""
    if spec.task is EvalTask.PERPLEXITY:
        return f"context_len={spec.context_len} prefill_len={spec.prefill_len} windows={spec.windows}"
    return (f"shots={spec.shots} limit={spec.limit or 'all'} decode_context={spec.decode_context} seed={spec.seed}"
            f" list_choices={str(spec.list_choices).lower()}")


def grid_points(spec: EvalSpec) -> list[Point]:
    groups = [spec.data] if spec.task is EvalTask.PERPLEXITY else [(d,) for d in spec.data]
    return [Point(data=g, kv=kv) for g in groups for kv in spec.grid()]


def _model_name(job: JobSpec) -> str:
    return job.model.name or Path(job.model.path).stem


def point_key(job: JobSpec, dtype: str, point: Point) -> tuple[str, ...]:
    return (job.eval.task.value, data_label(point.data), _model_name(job), dtype, kv_config(point.kv),
            eval_config(job.eval))


def data_label(paths: tuple[str, ...]) -> str:
    return "+".join(Path(p).name for p in paths)


# ---------------------------------------------------------------- CSV

def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of an existing accuracy.csv; a row cut short by a crash (last column missing) is dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != list(ACCURACY_COLUMNS):
            raise RunError(f"{path}: written by another version (different columns); move it aside")
        return [r for r in reader if r.get(ACCURACY_COLUMNS[-1]) and r.get("value")]


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(c, "")) for c in KEY_COLUMNS)


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one point's rows in one write, header first if the file is new (read_rows checked it)."""
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with path.open("rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"  # a crash mid-row: start the next row on its own line
    with path.open("a", newline="", encoding="utf-8") as f:
        if not is_new and cut:
            f.write("\n")
        writer = csv.DictWriter(f, fieldnames=ACCURACY_COLUMNS, restval="")
        if is_new:
            writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- the grid

def check_data(spec: EvalSpec) -> None:
    for i, p in enumerate(spec.data):
        if not Path(p).is_file():
            raise RunError(f"eval.data[{i}]: file not found: {p}")


def run_eval(job: JobSpec, *, progress: bool = True) -> EvalReport:
    """Run every grid point of `job.eval` not yet in accuracy.csv, then draw accuracy.png."""
    spec = job.eval
    check_data(spec)
    device = resolve_device(job.hardware.device)
    dtype = resolve_dtype(job.model.dtype, device)
    dtype_name = weights_label(dtype, job.model.weight_bits)
    if job.hardware.num_threads:
        torch.set_num_threads(job.hardware.num_threads)
    out_dir = job.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    csv_path, png_path = out_dir / "accuracy.csv", out_dir / "accuracy.png"
    points = grid_points(spec)
    done = {row_key(r) for r in read_rows(csv_path)}  # also checks the header before any work
    todo = [p for p in points if point_key(job, dtype_name, p) not in done]
    if todo:
        _run_points(job, todo, device, dtype, csv_path, progress, skipped=len(points) - len(todo))
    wanted = {point_key(job, dtype_name, p): i for i, p in enumerate(points)}
    rows = [r for r in read_rows(csv_path) if row_key(r) in wanted]
    rows.sort(key=lambda r: wanted[row_key(r)])
    title = f"{_model_name(job)} ({dtype_name}): {spec.task.value} vs KV sparsity\n" \
            f"data: {', '.join(Path(d).name for d in spec.data)}; {eval_config(spec)}"
    plot_accuracy(rows, png_path, title=title)
    return EvalReport(csv=csv_path, png=png_path, computed=len(todo), skipped=len(points) - len(todo), rows=rows)


def _run_points(job: JobSpec, todo: list[Point], device: torch.device, dtype: torch.dtype, csv_path: Path,
                progress: bool, skipped: int) -> None:
    loaded = load_model(name=job.model.name, path=job.model.path, dtype=dtype, device=device, seed=0,
                        weight_bits=job.model.weight_bits)
    lm = LM(loaded.config, loaded.weights, device, dtype, weight_bits=job.model.weight_bits)
    data = _Data(job.eval, loaded)
    commit = git_commit()
    bar = tqdm(total=skipped + len(todo), initial=skipped, unit="point", disable=not progress, dynamic_ncols=True)
    for point in todo:
        bar.set_postfix_str(f"{data_label(point.data)} {kv_label(point.kv)}")
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        measured = data.measure(lm, point, progress)
        common = _common(job, loaded, dtype, point, started, commit, seconds=time.perf_counter() - t0)
        append_rows(csv_path, [{**common, **m} for m in measured])
        bar.update(1)
    bar.close()


def _common(job: JobSpec, loaded: LoadedModel, dtype: torch.dtype, point: Point, started: str, commit: str,
            seconds: float) -> dict[str, Any]:
    spec, kv = job.eval, point.kv
    ppl = spec.task is EvalTask.PERPLEXITY
    return dict(
        job=job.name, task=spec.task.value, data=data_label(point.data), model=_model_name(job),
        dtype=weights_label(dtype, job.model.weight_bits), kv_policy=kv.policy, kv_label=kv_label(kv),
        sparsity=kv.sparsity if kv.sparsity is not None else (0.0 if kv.policy == "dense" else ""),
        budget_tokens=kv.budget_tokens if kv.budget_tokens is not None else "", bits=kv.bits, mode=kv.mode.value,
        score=kv.score or "", prefill_len=spec.prefill_len if ppl else "", windows=spec.windows if ppl else "",
        shots="" if ppl else spec.shots, decode_context="" if ppl else spec.decode_context,
        seconds=round(seconds, 2), started_at=started, git_commit=commit, kv_config=kv_config(kv),
        eval_config=eval_config(spec))


class _Data:
    """The task's tokenized data, built once per run and shared by every point."""

    def __init__(self, spec: EvalSpec, loaded: LoadedModel):
        self.spec, self.loaded = spec, loaded
        self.windows: list[list[int]] | None = None
        self.prompts: dict[str, list] = {}
        if spec.task is EvalTask.PERPLEXITY:
            if spec.context_len > loaded.config.max_seq_len:
                raise RunError(f"eval.context_len: {spec.context_len} exceeds the model's "
                               f"{loaded.config.max_seq_len}-token context")
            self.windows = text_windows(spec.data, loaded.tokenizer.encode, spec.context_len, spec.windows)
        else:
            for path in spec.data:
                self.prompts[path] = self._prompts(path)

    def _prompts(self, path: str) -> list:
        spec, tok = self.spec, self.loaded.tokenizer
        try:
            pool = load_questions(path)
            return build_prompts(pool[:spec.limit], pool, tok.encode, shots=spec.shots, seed=spec.seed,
                                 add_bos=tok.add_bos, list_choices=spec.list_choices)
        except MCDataError:
            raise
        except ValueError as e:
            raise RunError(f"{path}: {e}") from None

    def measure(self, lm: LM, point: Point, progress: bool) -> list[dict[str, Any]]:
        """The metric rows of one point (without the common columns)."""
        spec, kv = self.spec, point.kv.settings()
        if self.windows is not None:
            with tqdm(total=len(self.windows), unit="window", leave=False, disable=not progress) as bar:
                r = score_windows(lm, self.windows, spec.prefill_len, kv, spec.batch_size, on_window=bar.update)
            return [dict(metric=Metric.PERPLEXITY.value, value=round(r.perplexity, 4), tokens_scored=r.tokens,
                         context_len=spec.context_len)]
        prompts = self.prompts[point.data[0]]
        with tqdm(total=len(prompts), unit="question", leave=False, disable=not progress) as bar:
            r = score_prompts(lm, prompts, kv, batch_size=spec.batch_size, decode_context=spec.decode_context,
                              on_batch=bar.update)
        same = dict(tokens_scored=r.tokens_scored, questions=r.questions,
                    context_len=round(r.context_tokens / r.questions, 1))  # mc: mean context tokens
        return [dict(metric=Metric.ACC.value, value=round(r.acc, 4), **same),
                dict(metric=Metric.ACC_NORM.value, value=round(r.acc_norm, 4), **same)]
