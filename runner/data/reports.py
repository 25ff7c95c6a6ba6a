"""A run's per-batch time series (`batches.csv`) and its picture (`report.png`), so a user sees in the
morning how the night went: throughput batch by batch and the peak memory of each tier.

One row per finished batch (a block of the block executor, or a GPU batch of the plain engine),
appended and fsynced as the batch finishes, so a run that dies keeps the rows of what it finished.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path


from runner.data.outputs import TIER_PEAK_COLUMNS, named_errors
from runner.units import bytes_to_gib

BATCH_COLUMNS = ("batch", "prompts", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s",
                 "tokens_per_s", "elapsed_s", "peak_rss_bytes", "peak_gpu_bytes", *TIER_PEAK_COLUMNS)
# Memory columns plotted, with their legend labels
_MEMORY = {"peak_rss_bytes": "process RSS", "peak_gpu_bytes": "CUDA allocated",
           **dict(zip(TIER_PEAK_COLUMNS, ("gpu tier", "cpu tier", "disk tier")))}


@dataclass
class BatchLog:
    """Appends one row per finished batch to `path`, numbering batches from `start` (a resumed run goes
    on where the last one stopped); the header is written only to a new or empty file."""
    path: Path
    start: int = 0

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(BATCH_COLUMNS) + "\n")
        self.count = self.start
        # A resumed run's batches go on the same time axis, after the ones already logged.
        self.elapsed_before = _last_elapsed(self.path) if self.start else 0.0

    def append(self, row: dict, *, durable: bool = True) -> None:
        unknown = set(row) - set(BATCH_COLUMNS)
        if unknown:
            raise ValueError(f"{self.path}: unknown batch columns {sorted(unknown)}")
        with named_errors(self.path), self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=BATCH_COLUMNS, restval="").writerow({"batch": self.count, **row})
            f.flush()
            if durable:
                os.fsync(f.fileno())
        self.count += 1


def _last_elapsed(path: Path) -> float:
    """The elapsed_s of the last row logged (0 for a log with none)."""
    with named_errors(path), path.open(newline="", encoding="utf-8") as f:
        last = None
        for last in csv.DictReader(f):
            pass
    return float(last["elapsed_s"]) if last else 0.0


def plot_report(batches_csv: Path, png: Path, title: str) -> Path:
    """report.png: tokens/s of each batch against the run's elapsed time, and the peak bytes of each tier."""
    # Imported here, at the end of a run: pandas and matplotlib cost ~100 MB of RSS and 3 s of start-up,
    # which a run would otherwise carry through its whole generation.
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # the object API: no pyplot state

    rows = pd.read_csv(batches_csv)
    fig = Figure(figsize=(9, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(rows["elapsed_s"], rows["tokens_per_s"], marker="o", label="batch")
    total = rows["generated_tokens"].cumsum() / (rows["prefill_s"] + rows["decode_s"]).cumsum()
    top.plot(rows["elapsed_s"], total, linestyle="--", label="run so far")
    top.set_ylabel("generated tokens / s")
    top.set_title(title)
    top.legend(loc="best")
    for column, label in _MEMORY.items():
        if column in rows and rows[column].fillna(0).gt(0).any():
            bottom.plot(rows["elapsed_s"], bytes_to_gib(rows[column]), marker=".", label=label)
    bottom.set_ylabel("peak memory (GiB)")
    bottom.set_xlabel("elapsed (s) at the end of each batch")
    bottom.legend(loc="best")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png
