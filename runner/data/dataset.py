"""Prompts: stream a job's dataset (jsonl, csv, tsv, parquet, txt, a directory of those, or synthetic)
as `Prompt`s and `Reject`s.

A bad record is a `Reject` naming its file, line and reason (with `on_error: fail` it is a
`DatasetError` with the same one-line `file:line: reason`); a dataset that cannot be read at all is
a `DatasetError` naming the file. Files are read line by line (runner/data/formats.py), and the
ids seen so far are kept as 64-bit hashes, so memory stays flat however long the dataset is.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runner.data.formats import (SUFFIXES, DatasetError, Fields, RawRecord, count_file,
                                    dir_files, open_binary, parse_object, read_file)
from runner.data.spec import TEMPLATE_FIELD, DatasetFormat, DatasetSpec, OnError

__all__ = ["DatasetError", "Prompt", "Reject", "check_readable", "iter_records", "load_prompts", "count_records",
           "json_object", "reflow_paragraphs"]


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # after the template
    line: int  # 1-based source line (csv/tsv: where the row starts; parquet: row; synthetic: slice number)
    index: int  # 0-based position of the record in the whole dataset (a directory: its files by name)
    source: str = ""  # the file it came from
    token_ids: tuple[int, ...] | None = None  # synthetic only: the exact ids to feed the model
    # Byte offset in `source` just past the record (0: not a line format): what a resume fingerprints.
    # Where the record lies, not what it is: left out of ==.
    end: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class Reject:
    """A record that cannot be a prompt; it still has an index and counts toward `limit`."""
    index: int
    line: int
    source: str
    id: str | None  # when it could be read
    reason: str
    excerpt: str  # the raw record, bad bytes replaced, at most 200 characters
    end: int = dataclasses.field(default=0, compare=False)  # as Prompt.end

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "line": self.line, "source": self.source, "id": self.id,
                           "reason": self.reason, "excerpt": self.excerpt}, ensure_ascii=False)

    def message(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def iter_records(spec: DatasetSpec, tokenizer: Tokenizer | None = None,
                 default_count: int = 1) -> Iterator[Prompt | Reject]:
    """The records of `spec` in dataset order, after offset and limit (shard keys are not applied
    here). `tokenizer` is needed only for synthetic, which makes `spec.num_prompts` prompts, or
    `default_count` when that is unset. With `on_error: fail` the first Reject raises instead."""
    path = Path(spec.path)
    if spec.format is DatasetFormat.SYNTHETIC:
        yield from _synthetic(spec, path, tokenizer, spec.num_prompts or default_count)
        return
    builder = _Builder(spec)
    index = taken = 0
    for file, fmt, id_prefix in _files(spec, path):
        source = str(file)
        for raw in read_file(file, fmt, builder.fields, max(0, spec.offset - index)):
            if isinstance(raw, int):  # records before the offset, counted, not parsed
                index += raw
                continue
            item = builder.build(raw, index, source, id_prefix)
            index += 1
            if spec.on_error is OnError.FAIL and isinstance(item, Reject):
                raise DatasetError(item.message())
            yield item
            taken += 1
            if taken == spec.limit:
                return  # records past the limit are not even read


def check_readable(spec: DatasetSpec) -> None:
    """Raise now the DatasetError that reading would raise for a missing or unreadable file or directory
    (a run checks this before its model loads)."""
    for file, _, _ in _files(spec, Path(spec.path)):
        open_binary(file).close()


def load_prompts(spec: DatasetSpec, tokenizer: Tokenizer | None = None, default_count: int = 1) -> list[Prompt]:
    """All prompts of `spec` as a list; the first bad record raises a DatasetError (whatever on_error)."""
    prompts = []
    for item in iter_records(spec, tokenizer, default_count):
        if isinstance(item, Reject):
            raise DatasetError(item.message())
        prompts.append(item)
    return prompts


def count_records(spec: DatasetSpec, default_count: int | None = None) -> int | None:
    """About how many records `iter_records` yields (after offset and limit), for a progress bar:
    exact for parquet and synthetic, line counts otherwise (blank lines and the lines of multi-line
    csv cells count too). None when unknown (synthetic without num_prompts or default_count)."""
    path = Path(spec.path)
    if spec.format is DatasetFormat.SYNTHETIC:
        total = spec.num_prompts or default_count
        return None if total is None else min(total, spec.limit or total)
    total = sum(count_file(file, fmt) for file, fmt, _ in _files(spec, path))
    total = max(0, total - spec.offset)
    return total if spec.limit is None else min(total, spec.limit)


def _files(spec: DatasetSpec, path: Path) -> list[tuple[Path, DatasetFormat, str]]:
    """(file, its format, prefix of fallback ids): in a directory, ids fall back to "name:line" so
    that the line numbers of different files do not collide."""
    if spec.format is DatasetFormat.DIR:
        return [(file, SUFFIXES[file.suffix.lower()], f"{file.name}:") for file in dir_files(path)]
    return [(path, spec.format, "")]


def json_object(raw: str, where: str, error: type[Exception]) -> dict:
    """One JSONL line as a mapping; anything else raises `error` naming `where` (file:line)."""
    record, reason = parse_object(raw)
    if record is None:
        raise error(f"{where}: {reason}")
    return record


# ---------------------------------------------------------------- records to prompts

# {{ and }} are literal braces; a {name} is a field. One pass, so braces in values stay literal.
_TEMPLATE_PART = re.compile(r"\{\{|\}\}|" + TEMPLATE_FIELD.pattern)


def _template_parts(template: str) -> tuple[tuple[bool, str], ...]:
    """The template as (is_field, text) parts: literal text, or a field name."""
    parts, start = [], 0
    for m in _TEMPLATE_PART.finditer(template):
        parts.append((False, template[start:m.start()]))
        parts.append((True, m.group(1)) if m.group(1) else (False, m.group(0)[0]))
        start = m.end()
    parts.append((False, template[start:]))
    return tuple(p for p in parts if p[0] or p[1])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Builder:
    """Turns a RawRecord into a Prompt or a Reject: id, template, empty and duplicate checks."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.parts = _template_parts(spec.template) if spec.template is not None else None
        names = tuple(text for is_field, text in self.parts if is_field) if self.parts else (spec.field,)
        self.fields = Fields(names=names, field=spec.field, id_field=spec.id_field)
        self.ids = _IdSet()

    def build(self, raw: RawRecord, index: int, source: str, id_prefix: str) -> Prompt | Reject:
        record, reason, id_ = raw.record, raw.error, None
        if record is not None:
            id_, reason = self._id(record, raw.number, id_prefix)
        if reason is None:
            text, reason = self._text(record)
        if reason is None and not self.ids.add(id_):
            reason = f"duplicate id {id_!r}"
        if reason is not None:
            return Reject(index=index, line=raw.line, source=source, id=id_, reason=reason,
                          excerpt=raw.excerpt(), end=raw.end)
        return Prompt(id=id_, text=text, line=raw.line, index=index, source=source, end=raw.end)

    def _id(self, record: dict, number: int, prefix: str) -> tuple[str | None, str | None]:
        value = record.get(self.fields.id_field)
        if value is None or value == "":
            return f"{prefix}{number}", None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"field {self.fields.id_field!r} must be a string or integer, got {_short(value)}"
        return str(value), None

    def _text(self, record: dict) -> tuple[str | None, str | None]:
        if self.parts is None:
            field = self.fields.field
            if field not in record:
                return None, f"missing field {field!r}"
            value = record[field]
            if not isinstance(value, str):
                return None, f"field {field!r} must be a string, got {_short(value)}"
            return (value, None) if value.strip() else (None, "empty prompt")
        out, blank = [], True
        for is_field, text in self.parts:
            if not is_field:
                out.append(text)
                continue
            name = text if text in record or text != "prompt" else self.fields.field
            if name not in record:
                return None, f"missing field {name!r}"
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return None, f"field {name!r} must be a string or number, got {_short(value)}"
            value = value if isinstance(value, str) else str(value)
            blank = blank and not value.strip()
            out.append(value)
        # Empty means every inserted value is blank: the template's own text is no prompt.
        return (None, "empty prompt") if blank else ("".join(out), None)


class _IdSet:
    """The ids seen so far, as 64-bit hashes: ~8 bytes an id in a sorted array (plus a set of the
    latest up to 64k, merged in at once) instead of ~100 bytes an id in a set of strings.
    Two different ids with the same hash would make the later one a false duplicate: with n ids
    the chance is about n^2 / 2^65, 3e-8 at a million ids and 3e-6 at ten million."""

    _MERGE_EVERY = 1 << 16

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.int64)
        self._recent: set[int] = set()

    def add(self, key: str) -> bool:
        """Add `key`; False when it was already there."""
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                           "little", signed=True)
        if h in self._recent:
            return False
        arr = self._sorted
        if len(arr):
            i = arr.searchsorted(h)
            if i < len(arr) and arr[i] == h:
                return False
        self._recent.add(h)
        if len(self._recent) >= self._MERGE_EVERY:
            new = np.sort(np.fromiter(self._recent, dtype=np.int64, count=len(self._recent)))
            self._sorted = np.insert(arr, arr.searchsorted(new), new)  # a linear merge, no re-sort
            self._recent = set()
        return True


# ---------------------------------------------------------------- synthetic (FlexGen-style)

def reflow_paragraphs(text: str) -> str:
    """Undo hard wrapping: lines of a paragraph joined by a space, paragraphs by a blank line."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # tolerate the BOM spreadsheet exports add
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def _synthetic(spec: DatasetSpec, path: Path, tokenizer: Tokenizer | None, num_prompts: int) -> list[Prompt]:
    """`num_prompts` consecutive, non-overlapping slices of exactly `prompt_len` tokens of the text
    (read whole: it is a source text such as a book, not a list of records)."""
    if tokenizer is None:
        raise DatasetError(f"{path}: a synthetic dataset needs a tokenizer")
    text = _read_text(path)
    if path.suffix.lower() == ".txt":
        text = reflow_paragraphs(text)  # wrapped book text would put a newline every ~70 chars
    ids = list(tokenizer.encode(text))
    # Drop what encode adds to any text (e.g. BOS), so that every slice is pure text and all
    # prompts are alike; whether to prepend BOS is the generator's call, for every prompt.
    prefix = list(tokenizer.encode(""))
    if prefix and ids[:len(prefix)] == prefix:
        ids = ids[len(prefix):]
    if not ids:
        raise DatasetError(f"{path}: no tokens in the source text")
    count = num_prompts if spec.limit is None else min(num_prompts, spec.limit)
    prompts = []
    for i in range(count):
        start = i * spec.prompt_len
        # Wrap around to the start when the text is shorter than num_prompts * prompt_len.
        chunk = tuple(ids[(start + j) % len(ids)] for j in range(spec.prompt_len))
        prompts.append(Prompt(id=f"synthetic-{i}", text=tokenizer.decode(list(chunk)), line=i + 1, index=i,
                              source=str(path), token_ids=chunk))
    return prompts
