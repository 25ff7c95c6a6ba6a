"""Multiple choice under a KV policy: each choice scored by its log-likelihood given the context.

Prompt format, for k shots and one question, blank lines between blocks, empty parts left out
(an empty `input`, as in the cause_and_effect files, drops the Q line):

    {task_prefix}

    Q: {shot input}
    A: {shot's correct choice}

    Q: {input}
    A:

By default the choices are not shown (lm-eval's way for COPA / PIQA / SIQA: the model rates each
answer as text). With `list_choices` each Q is followed by BIG-bench's listing, one line per
choice, `  choice: {choice}`, which a task such as cause_and_effect_two_sentences needs to be a
question at all (its two choices are the cause and the effect).

The continuation scored is " " + choice. Context and continuation are tokenized separately
(without BOS on the continuation), so every choice of a question is scored after the very same
context tokens; for SmolLM2's byte-level BPE this equals tokenizing the joined text, because
" word" always starts a new pre-token. Choice order is shuffled per question with the seed
(the cause_and_effect files list the right choice first), for the listing and for ties in the
argmax, so nothing depends on the file's order. The shuffle and the shot draw are seeded with
`seed` and the question's file name and line, not the path as written, so a relative and an
absolute path to the same file (or a copy under another directory) give the same prompts.

Scoring runs as generation does: the contexts are prefilled densely (all but their last
`decode_context` tokens, which are then fed one at a time with the policy active), the batch is
forked with `Batch.select_rows` into one row per choice, and the choice tokens are fed one at a
time with the policy active. The logits before a choice's first token come from the shared
context, so a policy changes the score of a choice's later tokens (and, with decode_context, of
all of them). acc: argmax of the summed log-likelihood; acc_norm: argmax of log-likelihood per
character of the choice (lm-eval's acc_norm).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runner.data.dataset import json_object
from runner.kv.spec import KVSettings
from runner.engines.lm import LM, Batch


class MCDataError(ValueError):
    """A task file line that is not a valid question; the message names file and line."""


@dataclass(frozen=True, kw_only=True)
class Question:
    input: str
    choices: tuple[str, ...]
    label: int  # index of the correct choice
    task_prefix: str
    where: str  # "path:line" with the path as given, for error messages
    key: str  # "file name:line", the seed of its shuffle and shot draw (not the path as written)


@dataclass(frozen=True, kw_only=True)
class MCPrompt:
    context_ids: list[int]
    choice_ids: list[list[int]]  # one token list per choice (shuffled order)
    choice_chars: list[int]  # characters of each choice, for acc_norm
    label: int  # correct index in the shuffled order
    where: str


@dataclass(frozen=True, kw_only=True)
class MCResult:
    questions: int
    correct: int  # argmax of summed log-likelihood
    correct_norm: int  # argmax of log-likelihood per character
    context_tokens: int  # summed over questions
    tokens_scored: int  # choice tokens scored

    @property
    def acc(self) -> float:
        return self.correct / self.questions

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.questions


def load_questions(path: str | Path) -> list[Question]:
    """Every line of a BIG-bench style JSONL task file; a bad line raises naming file and line."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(_question(line, f"{path}:{n}", f"{Path(path).name}:{n}"))
    if not out:
        raise MCDataError(f"{path}: no questions")
    return out


def _question(line: str, where: str, key: str) -> Question:
    d = json_object(line, where, MCDataError)
    inp, choices, label, prefix = d.get("input"), d.get("choices"), d.get("label"), d.get("task_prefix", "")
    if not isinstance(inp, str) or not isinstance(prefix, str):
        raise MCDataError(f"{where}: 'input' and 'task_prefix' must be strings")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise MCDataError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise MCDataError(f"{where}: 'label' must be an integer in [0, {len(choices)}), got {label!r}")
    return Question(input=inp.strip(), choices=tuple(c.strip() for c in choices), label=label,
                    task_prefix=prefix.strip(), where=where, key=key)


def _shuffled(q: Question, rng: random.Random) -> tuple[list[str], int]:
    order = list(range(len(q.choices)))
    rng.shuffle(order)
    return [q.choices[i] for i in order], order.index(q.label)


def _block(q: Question, choices: list[str], answer: str | None, list_choices: bool) -> str:
    lines = [f"Q: {q.input}"] if q.input else []
    lines += [f"  choice: {c}" for c in choices] if list_choices else []
    lines.append("A:" if answer is None else f"A: {answer}")
    return "\n".join(lines)


def build_context(q: Question, shots: Sequence[Question], seed: int,
                  list_choices: bool = False) -> tuple[str, list[str], int]:
    """(context text, the question's choices in shuffled order, its label in that order)."""
    blocks = [q.task_prefix] if q.task_prefix else []
    for s in shots:
        choices, label = _shuffled(s, random.Random(f"{seed}:{s.key}"))
        blocks.append(_block(s, choices, choices[label], list_choices))
    choices, label = _shuffled(q, random.Random(f"{seed}:{q.key}"))
    blocks.append(_block(q, choices, None, list_choices))
    return "\n\n".join(blocks), choices, label


def build_prompts(questions: Sequence[Question], pool: Sequence[Question], encode: Callable[[str], list[int]],
                  *, shots: int, seed: int, add_bos: bool, list_choices: bool = False) -> list[MCPrompt]:
    """Tokenized prompts; each question's `shots` examples are drawn (seeded) from `pool` minus itself."""
    if shots > len(pool) - 1:
        raise ValueError(f"eval.shots: {shots} shots need {shots + 1} questions, the file has {len(pool)}")
    out = []
    for q in questions:
        others = [p for p in pool if p.key != q.key]
        drawn = random.Random(f"shots:{seed}:{q.key}").sample(others, shots)
        text, choices, label = build_context(q, drawn, seed, list_choices)
        # The continuation never gets a BOS: it is scored after the context, not as a new text.
        conts = [encode(" " + c)[1 if add_bos else 0:] for c in choices]
        out.append(MCPrompt(context_ids=encode(text), choice_ids=conts, choice_chars=[len(c) for c in choices],
                            label=label, where=q.where))
    return out


def score_prompts(lm: LM, prompts: Sequence[MCPrompt], kv: KVSettings, *, batch_size: int,
                  decode_context: int = 0, on_batch: Callable[[int], None] | None = None) -> MCResult:
    """Accuracy over `prompts`, `batch_size` questions per batch (each forked into one row per choice)."""
    correct = correct_norm = scored = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        lls = choice_loglikelihoods(lm, [p.context_ids for p in chunk], [p.choice_ids for p in chunk], kv,
                                    decode_context=decode_context, where=[p.where for p in chunk])
        for p, ll in zip(chunk, lls):
            correct += _argmax(ll) == p.label
            correct_norm += _argmax([x / n for x, n in zip(ll, p.choice_chars)]) == p.label
            scored += sum(len(c) for c in p.choice_ids)
        if on_batch is not None:
            on_batch(len(chunk))
    return MCResult(questions=len(prompts), correct=correct, correct_norm=correct_norm,
                    context_tokens=sum(len(p.context_ids) for p in prompts), tokens_scored=scored)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _logprob(logits: Tensor, targets: Tensor) -> Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def choice_loglikelihoods(lm: LM, contexts: Sequence[list[int]], choices: Sequence[Sequence[list[int]]],
                          kv: KVSettings, *, decode_context: int = 0,
                          where: Sequence[str] | None = None) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its question's context, [question][choice]."""
    for i, ctx in enumerate(contexts):
        if len(ctx) <= decode_context:
            at = where[i] if where else f"question {i}"
            raise ValueError(f"eval.decode_context: {at} has only {len(ctx)} context tokens, "
                             f"{decode_context} are to be decoded")
    rows = torch.tensor([q for q, cs in enumerate(choices) for _ in cs], device=lm.device)
    flat = [c for cs in choices for c in cs]
    width = max(len(c) for c in flat)
    # Padded choice tokens (row, step); a finished row feeds token 0, whose score is masked out.
    tokens = torch.zeros((len(flat), width), dtype=torch.long, device=lm.device)
    live = torch.zeros((len(flat), width), dtype=torch.bool, device=lm.device)
    for r, c in enumerate(flat):
        tokens[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        live[r, :len(c)] = True
    with torch.inference_mode():
        batch = Batch(lm, [c[:len(c) - decode_context] for c in contexts], decode_context + width - 1, kv)
        logits = batch.prefill()
        for t in range(decode_context, 0, -1):
            logits = batch.decode(torch.tensor([c[-t] for c in contexts], device=lm.device))
        fork = batch.select_rows(rows)
        logits = logits[rows]
        total = _logprob(logits, tokens[:, 0])
        for j in range(1, width):
            logits = fork.decode(tokens[:, j - 1])
            total += torch.where(live[:, j], _logprob(logits, tokens[:, j]), 0.0)
    out, r = [], 0
    for cs in choices:
        out.append([float(x) for x in total[r:r + len(cs)]])
        r += len(cs)
    return out
