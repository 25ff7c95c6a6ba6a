"""The generation loop of a run: dataset records in windows, windows in batches, each batch committed.

Records are cut into windows of W consecutive dataset positions (W = `dataset.bucket` when length
bucketing is on, else one batch), and every batch is formed inside one window: a window's prompts, in
dataset order or sorted by length, in chunks of one batch. So the batches (and therefore the greedy
outputs, bit for bit) do not depend on where an earlier run of the job stopped, on which shard of a
Ray run takes the window, or on records rejected in other windows; and memory holds one window at a time.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from runner.data.dataset import Prompt, Reject
from runner.data.spec import OnError
from runner.engines.base import BatchOutput, Engine
from runner.job import JobSpec
from runner.data.outputs import TIER_PEAK_COLUMNS, GenerationRecord, peak_rss_bytes
from runner.data.reports import BatchLog
from runner.resume import GENERATIONS, REJECTS, RunState, append_lines
from runner.engines.sampling import SamplingParams


class RunError(ValueError):
    """A job that cannot run as specified; the message names the job field or prompt."""


@dataclass
class Totals:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompts: int = 0
    rejects: int = 0
    max_prompt_len: int = 0
    kv_peak_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_phase_s: dict = field(default_factory=dict)

    def add(self, out: BatchOutput, ids: list[list[int]]) -> None:
        self.prefill_s += out.prefill_s
        self.decode_s += out.decode_s
        self.prompt_tokens += out.prompt_tokens
        self.generated_tokens += out.generated_tokens
        self.prompts += len(out.sequences)
        self.max_prompt_len = max(self.max_prompt_len, *map(len, ids))
        self.kv_peak_bytes = max(self.kv_peak_bytes, out.kv_bytes)
        self.kv_bytes_per_token = out.kv_bytes_per_token or self.kv_bytes_per_token
        for phase, seconds in out.kv_phase_s.items():
            self.kv_phase_s[phase] = self.kv_phase_s.get(phase, 0.0) + seconds


class StopRequest:
    """SIGINT / SIGTERM: the first asks the loop to stop after the batch in flight; a second abandons that
    batch at once (KeyboardInterrupt). Either way only committed batches count, so the run resumes."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; an embedding caller handles them
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def windows(records: Iterable[Prompt | Reject], size: int) -> Iterator[list[Prompt | Reject]]:
    """Consecutive records grouped by dataset position // size."""
    group: list[Prompt | Reject] = []
    for record in records:
        if group and record.index // size != group[0].index // size:
            yield group
            group = []
        group.append(record)
    if group:
        yield group


@dataclass
class Loop:
    """One run's pass over the dataset: what it needs and what it has done so far."""
    job: JobSpec
    engine: Engine
    params: SamplingParams
    state: RunState
    tokenize: Callable[[Prompt], list[int]]  # Prompt -> token ids, raising RunError for a prompt the model cannot take
    check_batch: Callable[[list[list[int]]], None]  # token ids of a batch -> None, raising RunError when it cannot fit
    step: int  # prompts per engine call
    stop: StopRequest
    totals: Totals = field(default_factory=Totals)
    interrupted: bool = False

    def run(self, records: Iterable[Prompt | Reject], total: int | None, progress: bool) -> Totals:
        with tqdm(total=total, initial=self.state.prompts + self.state.rejects, unit="prompt",
                  disable=not progress, dynamic_ncols=True) as bar:  # closed on errors too: the message follows
            return self._run(records, bar)

    def _run(self, records: Iterable[Prompt | Reject], bar: tqdm) -> Totals:
        log = BatchLog(self.state.out_dir / "batches.csv", start=self.state.batches)
        started = time.perf_counter()
        durable = self.job.output.resume
        for group in windows(records, self.state.window):
            if not self.state.owns(group[0].index):
                continue
            todo = [r for r in group if not self.state.is_done(r.index)]
            prompts, ids = self._admit(todo, durable)
            for start in range(0, len(prompts), self.step):
                if self.stop.signum is not None:
                    self.interrupted = True
                    break
                batch, batch_ids = prompts[start:start + self.step], ids[start:start + self.step]
                try:
                    out = self._generate(batch, batch_ids)
                except KeyboardInterrupt:  # a second signal: the batch in flight is abandoned
                    self.interrupted = True
                    break
                self._commit(batch, out, durable)
                log.append(_batch_row(self.engine, out, log.elapsed_before + time.perf_counter() - started),
                           durable=durable)
                self.state.batches = log.count
                if durable:
                    self.state.commit()
                bar.update(len(batch))
                elapsed = self.totals.prefill_s + self.totals.decode_s
                bar.set_postfix(tok_s=f"{self.totals.generated_tokens / elapsed:.1f}" if elapsed else "-")
            if self.interrupted:
                break
            bar.update(len(todo) - len(prompts))
        return self.totals

    def _admit(self, todo: list[Prompt | Reject], durable: bool) -> tuple[list[Prompt], list[list[int]]]:
        """A window's records: rejects written (and committed) now, prompts tokenized and, with
        bucketing, sorted by length (ties by position, so the order is the same on every run)."""
        rejects = [r for r in todo if isinstance(r, Reject)]
        prompts, ids = [], []
        for p in (r for r in todo if isinstance(r, Prompt)):
            try:
                prompts.append(p)
                ids.append(self.tokenize(p))
            except RunError as e:
                prompts.pop()
                rejects.append(Reject(index=p.index, line=p.line, source=p.source, id=p.id, reason=str(e),
                                      excerpt=p.text[:200], end=p.end))
        if rejects:
            if self.job.dataset.on_error is OnError.FAIL:
                raise RunError(f"dataset.on_error: fail: {rejects[0].message()}")
            append_lines(self.state.out_dir / REJECTS, (r.to_json() for r in rejects), durable=durable)
            self.totals.rejects += len(rejects)
            self.state.rejects += len(rejects)
            self.state.mark(r.index for r in rejects)
            self.state.read(rejects)
            if durable:
                self.state.commit()
        if self.job.dataset.bucket:
            order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), prompts[i].index))
            prompts, ids = [prompts[i] for i in order], [ids[i] for i in order]
        return prompts, ids

    def _generate(self, batch: list[Prompt], ids: list[list[int]]) -> BatchOutput:
        self.check_batch(ids)
        # Seeded per batch by its first position, so a resumed or sharded run samples what one run would.
        # Modulo 2^64: torch takes seeds in [0, 2^64), and any 64-bit generation.seed must work.
        generator = torch.Generator().manual_seed((self.params.seed * 1_000_003 + batch[0].index) % 2 ** 64)
        out = self.engine.generate(ids, self.params, generator)
        self.totals.add(out, ids)
        return out

    def _commit(self, batch: list[Prompt], out: BatchOutput, durable: bool) -> None:
        records = [GenerationRecord(id=p.id, index=p.index, prompt=p.text, completion=s.text,
                                    completion_token_ids=s.token_ids, finish_reason=s.finish_reason)
                   for p, s in zip(batch, out.sequences)]
        append_lines(self.state.out_dir / GENERATIONS, (r.to_json() for r in records), durable=durable)
        self.state.prompts += len(records)
        self.state.mark(p.index for p in batch)
        self.state.read(batch)


def _batch_row(engine: Engine, out: BatchOutput, elapsed: float) -> dict:
    """One batches.csv row: the batch's tokens and seconds, and the run's memory peaks so far."""
    seconds = out.prefill_s + out.decode_s
    row = {"prompts": len(out.sequences), "prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
           "prefill_s": round(out.prefill_s, 6), "decode_s": round(out.decode_s, 6),
           "tokens_per_s": round(out.generated_tokens / seconds, 3) if seconds else 0.0,
           "elapsed_s": round(elapsed, 3), "peak_rss_bytes": peak_rss_bytes(),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}
    stats = engine.stats()  # the block executor's tier pools' peaks; other engines have none
    row.update({k: stats[k] for k in TIER_PEAK_COLUMNS if k in stats})
    return row
