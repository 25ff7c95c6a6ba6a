"""Prompts: read a job's dataset (jsonl, csv, txt or synthetic) into a list of `Prompt`.

Every problem is a `DatasetError` whose one-line message starts with `file:line:` so the user
can jump straight to the offending record.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runner.dataset_spec import DatasetFormat, DatasetSpec


class DatasetError(ValueError):
    """Unreadable or invalid dataset; the message names the file (and line when there is one)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    line: int  # 1-based source line (csv: line where the row starts; synthetic: 1-based slice number)
    token_ids: tuple[int, ...] | None = None  # synthetic only: the exact ids to feed the model


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def load_prompts(spec: DatasetSpec, tokenizer: Tokenizer | None = None, default_count: int = 1) -> list[Prompt]:
    """Read, check and template the prompts of `spec`; `tokenizer` is needed only for synthetic,
    which makes `spec.num_prompts` prompts, or `default_count` when that is unset."""
    path = Path(spec.path)
    if spec.format is DatasetFormat.SYNTHETIC:
        return _synthetic(spec, path, tokenizer, spec.num_prompts or default_count)
    text = _read_text(path)
    readers = {DatasetFormat.JSONL: _jsonl, DatasetFormat.CSV: _csv, DatasetFormat.TXT: _txt}
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for prompt in readers[spec.format](spec, path, text):
        if not prompt.text.strip():
            raise DatasetError(f"{path}:{prompt.line}: empty prompt")
        if prompt.id in first_line:
            raise DatasetError(f"{path}:{prompt.line}: duplicate id {prompt.id!r} "
                               f"(first on line {first_line[prompt.id]})")
        first_line[prompt.id] = prompt.line
        if spec.template is not None:
            # str.replace rather than str.format: braces in the user's text must stay literal.
            prompt = Prompt(id=prompt.id, text=spec.template.replace("{prompt}", prompt.text), line=prompt.line)
        prompts.append(prompt)
        if spec.limit is not None and len(prompts) == spec.limit:
            break  # records past the limit are not even parsed
    return prompts


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


def _lines(text: str):
    # split("\n") rather than splitlines(): JSON strings may legally hold U+2028 and friends.
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _record_id(record: dict[str, Any], spec: DatasetSpec, path: Path, line: int, fallback: int) -> str:
    value = record.get(spec.id_field)
    if value is None or value == "":
        return str(fallback)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DatasetError(f"{path}:{line}: field {spec.id_field!r} must be a string or integer, got {value!r}")
    return str(value)


def _prompt_field(record: dict[str, Any], spec: DatasetSpec, path: Path, line: int) -> str:
    if spec.field not in record:
        raise DatasetError(f"{path}:{line}: missing field {spec.field!r}")
    value = record[spec.field]
    if not isinstance(value, str):
        raise DatasetError(f"{path}:{line}: field {spec.field!r} must be a string, got {value!r}")
    return value


def json_object(raw: str, where: str, error: type[Exception]) -> dict:
    """One JSONL line as a mapping; anything else raises `error` naming `where` (file:line)."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl(spec: DatasetSpec, path: Path, text: str):
    for line, raw in _lines(text):
        if not raw.strip():
            continue
        record = json_object(raw, f"{path}:{line}", DatasetError)
        text_ = _prompt_field(record, spec, path, line)
        yield Prompt(id=_record_id(record, spec, path, line, line), text=text_, line=line)


def _csv(spec: DatasetSpec, path: Path, text: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: empty file (a header row is required)")
        if spec.field not in header:
            raise DatasetError(f"{path}: column {spec.field!r} not found (columns: {', '.join(header)})")
        row_number = 0
        end_of_previous = reader.line_num
        for row in reader:
            line = end_of_previous + 1  # a quoted cell may span lines; report where the row starts
            end_of_previous = reader.line_num
            if not row:
                continue  # blank line
            row_number += 1
            if len(row) != len(header):
                raise DatasetError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
            record = dict(zip(header, row))
            yield Prompt(id=_record_id(record, spec, path, line, row_number),
                         text=_prompt_field(record, spec, path, line), line=line)
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None


def _txt(spec: DatasetSpec, path: Path, text: str):
    for line, raw in _lines(text):
        if raw.strip():
            yield Prompt(id=str(line), text=raw, line=line)


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


def _synthetic(spec: DatasetSpec, path: Path, tokenizer: Tokenizer | None, num_prompts: int) -> list[Prompt]:
    """`num_prompts` consecutive, non-overlapping slices of exactly `prompt_len` tokens of the text."""
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
        prompts.append(Prompt(id=f"synthetic-{i}", text=tokenizer.decode(list(chunk)), line=i + 1,
                              token_ids=chunk))
    return prompts
