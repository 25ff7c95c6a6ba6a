"""Result files of a run: generations (JSON lines) and the throughput CSV (FlexGen's metrics).

Throughput definitions follow FlexGen, generalised to prompts and completions of varying length:
prefill handles every prompt token, decode produces every generated token after each sequence's
first (the first comes out of the prefill forward pass).
"""
from __future__ import annotations

import contextlib
import csv
import enum
import json
import resource
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the dtype label takes a torch dtype; this layer never needs torch at run time
    import torch


class FinishReason(str, enum.Enum):
    EOS = "eos"
    STOP = "stop"  # a generation.stop string matched
    LENGTH = "length"  # hit max_new_tokens


@dataclass(frozen=True, kw_only=True)
class GenerationRecord:
    id: str
    prompt: str
    completion: str
    completion_token_ids: list[int]
    finish_reason: FinishReason  # a plain "eos" / "stop" / "length" is accepted and converted
    index: int | None = None  # 0-based position of the record in the dataset (runner.data.dataset.Prompt.index)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "finish_reason", FinishReason(self.finish_reason))
        except ValueError:
            raise ValueError(f"record {self.id!r}: finish_reason must be one of "
                             f"{', '.join(r.value for r in FinishReason)}, got {self.finish_reason!r}") from None

    def to_json(self) -> str:
        return json.dumps({
            "id": self.id, **({} if self.index is None else {"index": self.index}), "prompt": self.prompt, "completion": self.completion,
            "completion_token_ids": [int(t) for t in self.completion_token_ids],
            "finish_reason": self.finish_reason.value,
        }, ensure_ascii=False)


# Decode phase seconds of the KV store (runner.kv.store.PHASES), summed over layers and steps.
KV_PHASE_COLUMNS: tuple[str, ...] = ("kv_store_s", "kv_score_s", "kv_select_s", "kv_gather_s", "kv_attend_s")
# Peak bytes of the executor's memory tiers: in a run's row and in each batch's (runner.data.reports).
TIER_PEAK_COLUMNS: tuple[str, ...] = ("peak_gpu_pool_bytes", "peak_cpu_pool_bytes", "peak_disk_bytes")

_BASE_COLUMNS: tuple[str, ...] = (
    "job", "engine", "model", "dtype", "device", "kv_policy", "gpu_batch_size", "num_gpu_batches",
    "num_prompts", "prompt_len", "gen_len", "prefill_latency_s", "prefill_throughput",
    "decode_latency_s", "decode_throughput", "total_latency_s", "total_throughput",
    "peak_gpu_bytes", "peak_cpu_bytes", "started_at", "git_commit",
    # extras beyond FlexGen's columns
    "kv_bytes_per_token", "num_threads", "sweep_point",
    "decode_attention",  # our engine's decode attention kernels: native | torch (runner.model.kernels)
    "greedy_head",  # our engine's greedy argmax: bf16-screen | full (runner.model.greedy_head); empty when sampling
    "kv_mode", "kv_sparsity", "kv_budget_tokens", "kv_bits", "kv_peak_bytes",
    "kv_max_ppl_increase",  # the job's quality budget, when kv_sparsity and kv_bits are what it picked
    *KV_PHASE_COLUMNS,
    # the run itself: complete | interrupted; prompts finished by earlier runs of the same job (resumed),
    # dataset records rejected (rejects.jsonl) by this run; Ray workers (1 without a cluster)
    "status", "resumed_prompts", "rejected_prompts", "workers",
)

# Columns of jobs with an `offload` section: the link the job states (run_job) and whatever
# `Executor.stats()` returns. Declared here, not taken from the executor at run time, so every run
# writes the same header and rows of different runs line up; empty cells where a run has no value.
# To report a new executor figure, append its name here (a CSV written before is upgraded in
# place on its next append, see `_upgrade_header`).
OFFLOAD_COLUMNS: tuple[str, ...] = (
    "link_gbps", "link_emulated",  # hardware.link: the host<->gpu bandwidth, and whether it was emulated
    # peak bytes per tier, bytes moved per direction
    *TIER_PEAK_COLUMNS,
    "bytes_gpu_from_cpu", "bytes_cpu_from_gpu", "bytes_disk_read", "bytes_disk_write",
    # time: compute thread blocked on copies, recomputing KV; emulated link time per direction
    "transfer_wait_s", "recompute_s", "link_busy_gpu_from_cpu_s", "link_busy_cpu_from_gpu_s",
    # ALISA's three KV phases: decode time in each, KV bytes moved per link direction (and of those up,
    # the picks fetched before their layer ran), (token, layer) K/V pairs recomputed and the cpu bytes
    # fetching them would have moved
    "phase1_s", "phase2_s", "phase3_s", "kv_bytes_gpu_from_cpu", "kv_bytes_cpu_from_gpu", "kv_bytes_fetched_ahead",
    # per phase: decode step time blocked on copies, recomputing K/V, and the rest (computing)
    "phase1_wait_s", "phase1_recompute_s", "phase1_compute_s", "phase2_wait_s", "phase2_recompute_s",
    "phase2_compute_s", "phase3_wait_s", "phase3_recompute_s", "phase3_compute_s",
    "recomputed_tokens", "recompute_saved_bytes",
)

# The cost model's prediction for the run's own plan (runner.planner.predicted_columns), beside the
# measured throughputs: on the job's hardware.profile, or on a CPU run the shipped cpu-only one.
PREDICTED_THROUGHPUT_COLUMNS: tuple[str, ...] = (
    "predicted_prefill_throughput", "predicted_decode_throughput", "predicted_total_throughput",
)
PREDICTED_COLUMNS: tuple[str, ...] = ("predicted_profile", *PREDICTED_THROUGHPUT_COLUMNS)

THROUGHPUT_COLUMNS: tuple[str, ...] = _BASE_COLUMNS + OFFLOAD_COLUMNS + PREDICTED_COLUMNS + ("notes",)
# Columns older versions declared but no run ever filled: a CSV written then still has them, empty, and
# `_upgrade_header` drops them (a value in one would be data, so it refuses instead).
RETIRED_COLUMNS: frozenset[str] = frozenset({"compute_s"})
# Columns a row's figures derive (append_csv_row computes them; a merged row recomputes them).
COMPUTED_COLUMNS = frozenset({"num_prompts", "prompt_len", "gen_len", "prefill_latency_s", "prefill_throughput",
                       "decode_latency_s", "decode_throughput", "total_latency_s", "total_throughput"})



def weights_label(dtype: torch.dtype, weight_bits: int | None) -> str:
    """The CSV's dtype column: the model dtype, with "+int8w" when the linear weights are int8
    (model.weight_bits: 8), so rows of both sit side by side in one accuracy.csv."""
    name = str(dtype).removeprefix("torch.")
    return f"{name}+int8w" if weight_bits == 8 else name

def _rate(tokens: float, seconds: float) -> float:
    return round(tokens / seconds, 2) if seconds > 0 else 0.0


def throughput_row(*, prefill_latency_s: float, decode_latency_s: float, num_prompts: int,
                   prompt_tokens: int, generated_tokens: int, **fields: Any) -> dict[str, Any]:
    """One CSV row: the timing columns computed from token counts, plus the other `fields` as given.

    prefill_throughput = prompt_tokens / prefill; decode_throughput = (generated - num_prompts) /
    decode; total_throughput = generated / (prefill + decode). With fixed lengths these equal
    FlexGen's n*prompt_len/prefill, n*(gen_len-1)/decode and n*gen_len/total.
    """
    unknown = set(fields) - set(THROUGHPUT_COLUMNS)
    if unknown:
        raise ValueError(f"throughput_row: unknown columns {sorted(unknown)} (an executor figure? declare it "
                         "in runner.data.outputs.OFFLOAD_COLUMNS)")
    computed_given = set(fields) & COMPUTED_COLUMNS
    if computed_given:
        raise ValueError(f"throughput_row: {sorted(computed_given)} are computed, don't pass them")
    if min(prefill_latency_s, decode_latency_s, num_prompts, prompt_tokens, generated_tokens) < 0:
        raise ValueError("throughput_row: latencies and token counts must be >= 0")
    total = prefill_latency_s + decode_latency_s
    row = dict(fields)
    row.update(
        num_prompts=num_prompts,
        prompt_len=round(prompt_tokens / num_prompts, 2) if num_prompts else 0.0,
        gen_len=round(generated_tokens / num_prompts, 2) if num_prompts else 0.0,
        # Latencies keep sub-millisecond precision; tiny CPU runs would otherwise show 0.0.
        prefill_latency_s=round(prefill_latency_s, 6),
        prefill_throughput=_rate(prompt_tokens, prefill_latency_s),
        decode_latency_s=round(decode_latency_s, 6),
        decode_throughput=_rate(max(generated_tokens - num_prompts, 0), decode_latency_s),
        total_latency_s=round(total, 6),
        total_throughput=_rate(generated_tokens, total),
    )
    return {c: row[c] for c in THROUGHPUT_COLUMNS if c in row}


def append_csv_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` to the throughput CSV, writing the header only when the file is new or empty."""
    path = Path(path)
    unknown = [k for k in row if k not in THROUGHPUT_COLUMNS]
    if unknown:
        raise ValueError(f"{path}: unknown throughput columns {unknown} (known: {', '.join(THROUGHPUT_COLUMNS)})")
    is_new = not path.exists() or path.stat().st_size == 0
    if not is_new:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != list(THROUGHPUT_COLUMNS):
            _upgrade_header(path, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=THROUGHPUT_COLUMNS, restval="")
        if is_new:
            writer.writeheader()
        writer.writerow(row)


def _upgrade_header(path: Path, header: list[str]) -> None:
    """Rewrite a CSV written by an older version under the current header, keeping every row.

    Only when the old columns are today's (columns were added) or retired ones left empty in every
    row; anything else would silently shift or drop data, so it is an error.
    """
    if not set(header) <= set(THROUGHPUT_COLUMNS) | RETIRED_COLUMNS:
        raise ValueError(f"{path}: existing header has columns this version does not know "
                         f"({sorted(set(header) - set(THROUGHPUT_COLUMNS) - RETIRED_COLUMNS)}); move the file "
                         "aside or write to another output.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    filled = sorted({c for row in rows for c in RETIRED_COLUMNS & set(row) if row[c]})
    if filled:
        raise ValueError(f"{path}: retired columns {filled} hold values this version would drop; move the file "
                         "aside or write to another output.csv")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=THROUGHPUT_COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # atomic: a crash leaves either the old file or the new one


def git_commit(repo: str | Path | None = None) -> str:
    """Short HEAD hash of `repo` (default: the one holding this file), "-dirty" if tracked files outside
    `results/` changed; "unknown" without git or commits. Benchmarks rewrite the committed CSVs under
    `results/` as they run: counting those would mark every benchmark row dirty, and the tag could no
    longer say whether the code that ran was the commit's."""
    repo = Path(__file__).resolve().parent if repo is None else Path(repo)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top,exclude)results"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM where Linux has it. Not ru_maxrss first: that one
    survives fork + exec, so a child starts at its parent's peak (a run started by a 0.9 GB pytest or
    sweep driver would report at least 0.9 GB). ru_maxrss (KiB on Linux) elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def named_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full) names its file: Python's write errors carry no file name."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
