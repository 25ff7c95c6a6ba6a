"""Batched generation with per-sequence stopping, timed the way FlexGen reports it.

Prefill latency is the first step (prompt forward + first token); decode latency is
every later step, so prefill and decode throughput come out as FlexGen defines them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

from runner.kv.spec import KVSettings
from runner.engines.lm import LM, Batch
from runner.data.outputs import FinishReason
from runner.engines.sampling import SamplingParams, next_tokens


class TextDecoder(Protocol):
    eos_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SequenceOutput:
    token_ids: list[int] = field(default_factory=list)  # generated ids, without the EOS itself
    text: str = ""
    finish_reason: FinishReason = FinishReason.LENGTH


@dataclass
class BatchOutput:
    sequences: list[SequenceOutput]
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    generated_tokens: int  # tokens actually produced (counting each EOS), as FlexGen counts steps
    kv_bytes: int = 0  # KV storage allocated for this batch (0 when the engine does not say)
    kv_bytes_per_token: int = 0  # stored bytes of one token's K and V over all layers
    kv_phase_s: dict[str, float] = field(default_factory=dict)  # decode phase -> seconds (kv.profile)


class StopTracker:
    """Decides per sequence when generation ends: EOS, a stop string, or the length limit."""

    def __init__(self, n: int, params: SamplingParams, tokenizer: TextDecoder):
        self.params, self.tok = params, tokenizer
        self.eos = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
        self.outputs = [SequenceOutput() for _ in range(n)]
        self.done = [False] * n
        self.steps = [0] * n
        self._stop_span = max((len(s) for s in params.stop), default=0) + 4

    def add(self, tokens: list[int]) -> bool:
        """Record one step's tokens; returns True when every sequence has finished."""
        for i, t in enumerate(tokens):
            if self.done[i]:
                continue
            out = self.outputs[i]
            self.steps[i] += 1
            if t in self.eos:
                self._finish(i, FinishReason.EOS)
                continue
            out.token_ids.append(t)
            if self.params.stop and self._hit_stop(out):
                self._finish(i, FinishReason.STOP)
            elif len(out.token_ids) >= self.params.max_new_tokens:
                self._finish(i, FinishReason.LENGTH)
        return all(self.done)

    def _hit_stop(self, out: SequenceOutput) -> bool:
        # A stop string that just appeared lies within its length in tokens (+ slack for byte
        # pieces) of the end, so only that tail is decoded per step, not the whole completion.
        tail = self.tok.decode(out.token_ids[-(self._stop_span):])
        if not any(s in tail for s in self.params.stop):
            return False
        text = self.tok.decode(out.token_ids)
        cuts = [text.find(s) for s in self.params.stop if s in text]
        if not cuts:
            return False
        out.text = text[:min(cuts)]
        return True

    def _finish(self, i: int, reason: FinishReason) -> None:
        out = self.outputs[i]
        self.done[i] = True
        out.finish_reason = reason
        if reason is not FinishReason.STOP:
            out.text = self.tok.decode(out.token_ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_batch(lm: LM, prompts: list[list[int]], params: SamplingParams, tokenizer: TextDecoder,
                   generator: torch.Generator | None = None, kv: KVSettings | None = None) -> BatchOutput:
    """Generate for one batch of tokenized prompts (any lengths; left-padded together)."""
    tracker = StopTracker(len(prompts), params, tokenizer)
    with torch.inference_mode():
        t0 = time.perf_counter()
        # Greedy: the LM's head returns the argmax tokens itself (exact; see runner/model/greedy_head.py).
        batch = Batch(lm, prompts, params.max_new_tokens, kv, greedy=not params.do_sample)

        def pick(out: torch.Tensor) -> torch.Tensor:
            return out if batch.greedy else next_tokens(out, params, generator)

        tokens = pick(batch.prefill())
        all_done = tracker.add(tokens.tolist())  # .tolist() syncs the device
        t1 = time.perf_counter()
        while not all_done:
            tokens = pick(batch.decode(tokens))
            all_done = tracker.add(tokens.tolist())
        _sync(lm.device)
        t2 = time.perf_counter()
    return BatchOutput(sequences=tracker.outputs, prefill_s=t1 - t0, decode_s=t2 - t1,
                       prompt_tokens=sum(len(p) for p in prompts), generated_tokens=sum(tracker.steps),
                       kv_bytes=batch.kv.nbytes, kv_bytes_per_token=batch.kv.cache.bytes_per_token(),
                       kv_phase_s=dict(batch.kv.clock.totals) if batch.kv.clock.enabled else {})


@runtime_checkable
class Engine(Protocol):
    """What a run asks of an engine: ours (runner.engines.alisa), HF's (runner.engines.hf) or the block
    executor (runner.offload.executor)."""
    name: str

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None) -> BatchOutput: ...

    def reset_stats(self) -> None:
        """Measure `stats` from now (after the warm-up run)."""
        ...

    def stats(self) -> dict[str, int | float]:
        """The engine's own CSV columns since `reset_stats` (runner.data.outputs.OFFLOAD_COLUMNS); {} if none."""
        ...

    def close(self) -> None:
        """Free what the engine holds beyond Python objects (copy threads, disk files); idempotent."""
        ...
