"""Record readers of the dataset formats: each streams one file as `RawRecord`s, never the whole file.

A reader turns bytes into field mappings and nothing more; ids, templates, empty prompts and
duplicates are `runner.data.dataset`'s business. Files are read in binary and split on b"\\n" only
(JSON strings may hold U+2028), each line decoded on its own so that one line of bad bytes is one
bad record. Blank lines are not records. A reader given `skip` counts the first `skip` records
without parsing them and yields their number as an int (offset must not cost a parse).
"""
from __future__ import annotations

import codecs
import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from runner.data.spec import DatasetFormat


class DatasetError(ValueError):
    """Unreadable or invalid dataset; the message names the file (and line when there is one)."""


SUFFIXES = {".jsonl": DatasetFormat.JSONL, ".csv": DatasetFormat.CSV, ".tsv": DatasetFormat.TSV,
            ".parquet": DatasetFormat.PARQUET, ".txt": DatasetFormat.TXT}
EXCERPT_CHARS = 200
_PARQUET_BATCH = 1024  # rows per pandas frame: a few MB even with long prompts, so memory stays flat
_CSV_FIELD_LIMIT = 1 << 24  # csv's default (128 KiB) is below a long-context prompt; 16 Mi chars is not


class RawRecord(NamedTuple):
    """One record as read: `record` is its fields, or None with `error` saying why it could not be read.
    A NamedTuple rather than a dataclass: one is made per record, and this is the hot loop."""
    line: int  # 1-based line where it starts (parquet: row)
    number: int  # 1-based number for a fallback id (jsonl/txt: line, csv/tsv: data row, parquet: row)
    record: dict[str, Any] | None
    error: str | None
    raw: Any  # bytes, list of bytes (csv lines) or a dict (parquet row): only ever read for an excerpt
    end: int = 0  # byte offset in the file just past the record (0 for parquet): what a resume fingerprints

    def excerpt(self) -> str:
        raw = self.raw
        if isinstance(raw, dict):
            return json.dumps(raw, ensure_ascii=False, default=str)[:EXCERPT_CHARS]
        if isinstance(raw, list):
            raw = b"".join(raw[:8])  # a few lines are plenty for 200 characters
        return raw[:4 * EXCERPT_CHARS].decode("utf-8", "replace").rstrip("\r\n")[:EXCERPT_CHARS]


@dataclass(frozen=True)
class Fields:
    """What the prompt is built from: `names` are looked up in each record ({prompt} falls back to
    `field` when a record has no key "prompt"); `id_field` is optional in every record."""
    names: tuple[str, ...]
    field: str
    id_field: str

    def missing(self, columns: list[str]) -> str | None:
        """The first name no column provides, if any."""
        for name in self.names:
            if name not in columns and not (name == "prompt" and self.field in columns):
                return name
        return None


def parse_object(text: str) -> tuple[dict | None, str | None]:
    """One JSONL line as (mapping, None), or (None, reason) when it is not a JSON object."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def open_binary(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line, bytes without "\\n" or "\\r\\n", byte offset past the line); the BOM spreadsheet
    exports add is dropped."""
    first = f.readline()
    if not first:
        return
    end = len(first)
    yield 1, first.removeprefix(codecs.BOM_UTF8).removesuffix(b"\n").removesuffix(b"\r"), end
    for number, raw in enumerate(f, start=2):
        end += len(raw)
        yield number, raw.removesuffix(b"\n").removesuffix(b"\r"), end


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 ({e.reason} at byte {e.start + 1} of the line)"


def _line_records(path: Path, skip: int) -> Iterator[tuple[int, bytes, str | None, str | None, int] | int]:
    """One record per non-blank line: (line, raw, text, UTF-8 error, end offset), or 1 for each of the
    first `skip` records (counted, not decoded)."""
    with open_binary(path) as f:
        for line, raw, end in _lines(f):
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                yield 1
                continue
            yield (line, raw, *_decode(raw), end)


def read_jsonl(path: Path, fields: Fields, skip: int) -> Iterator[RawRecord | int]:
    for item in _line_records(path, skip):
        if item == 1:
            yield 1
            continue
        line, raw, text, error, end = item
        record = None
        if error is None:
            record, error = parse_object(text)
        yield RawRecord(line, line, record, error, raw, end)


def read_txt(path: Path, fields: Fields, skip: int) -> Iterator[RawRecord | int]:
    bad = [name for name in fields.names if name not in ("prompt", fields.field)]
    if bad:
        raise DatasetError(f"{path}: a txt dataset has only the field 'prompt'; the template names {bad[0]!r}")
    for item in _line_records(path, skip):
        if item == 1:
            yield 1
            continue
        line, raw, text, error, end = item
        record = None if error else {"prompt": text, fields.field: text}
        yield RawRecord(line, line, record, error, raw, end)


class _RowLines:
    """Decoded lines for csv.reader, remembering the raw bytes of the row being read (for its
    excerpt) and the first bad UTF-8 in it. csv.reader pulls no line past the end of a row."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.count = 0  # lines handed out so far
        self.end = 0  # byte offset past them
        self.raw: list[bytes] = []
        self.error: str | None = None
        self.ended = False  # the row being read reached the end of the file
        self._replay: list[bytes] = []  # lines to hand out again before the file's next ones

    def __iter__(self) -> _RowLines:
        return self

    def __next__(self) -> str:
        try:
            raw = self._replay.pop() if self._replay else next(self._f)
        except StopIteration:
            self.ended = True
            raise
        self.count += 1
        self.end += len(raw)
        if self.count == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        self.raw.append(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.error is None:
                self.error = f"invalid UTF-8 ({e.reason} at byte {e.start + 1} of line {self.count})"
            return raw.decode("utf-8", "replace")

    def next_row(self) -> None:
        self.raw, self.error, self.ended = [], None, False

    def replay_after_first(self, first_line: int) -> None:
        """Hand out the lines of the row just read again, all but its first (which started at `first_line`)."""
        self._replay = self.raw[1:][::-1]
        self.count = first_line
        self.end -= sum(map(len, self._replay))


def _unterminated(raw: list[bytes], delimiter: str) -> bool:
    """Whether a row read to the end of the file ends inside a quoted cell: csv.reader (not strict) would
    take every line after an unclosed quote into one cell. Strict parsing says so ("unexpected end of data")."""
    try:
        for _ in csv.reader((r.decode("utf-8", "replace") for r in raw), delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def read_csv(path: Path, fields: Fields, skip: int, delimiter: str = ",") -> Iterator[RawRecord | int]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with open_binary(path) as f:
        lines = _RowLines(f)
        reader = csv.reader(lines, delimiter=delimiter)
        header = _csv_header(path, reader, lines)
        missing = fields.missing(header)
        if missing is not None:
            raise DatasetError(f"{path}: column {missing!r} not found (columns: {', '.join(header)})")
        row_number = 0
        while True:
            start = lines.count + 1  # a quoted cell may span lines; report where the row starts
            lines.next_row()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # csv.reader resets itself, so the next row reads normally
                row, error = None, f"invalid CSV ({e})"
            else:
                error = lines.error
            if row == []:
                continue  # blank line
            if lines.ended and _unterminated(lines.raw, delimiter):  # one bad record, not the rest of the file
                row, error = None, (f"unterminated quote: the quoted cell opened in this row never closes "
                                    f"(it would take lines {start}-{lines.count}, to the end of the file)")
                lines.replay_after_first(start)
            row_number += 1
            if skip:
                skip -= 1
                yield 1
                continue
            if error is None and len(row) != len(header):
                error = f"expected {len(header)} columns, got {len(row)}"
            record = None if error else dict(zip(header, row))
            yield RawRecord(start, row_number, record, error, lines.raw, lines.end)


def _csv_header(path: Path, reader: Any, lines: _RowLines) -> list[str]:
    try:
        for header in reader:
            if lines.error:
                raise DatasetError(f"{path}:{lines.count}: header: {lines.error}")
            if header:
                return header
    except csv.Error as e:
        raise DatasetError(f"{path}:{lines.count}: header: invalid CSV ({e})") from None
    raise DatasetError(f"{path}: empty file (a header row is required)")


def read_parquet(path: Path, fields: Fields, skip: int) -> Iterator[RawRecord | int]:
    pf = _parquet_file(path)
    columns = pf.schema_arrow.names
    missing = fields.missing(columns)
    if missing is not None:
        raise DatasetError(f"{path}: column {missing!r} not found (columns: {', '.join(columns)})")
    wanted = [c for c in columns if c in fields.names or c in (fields.field, fields.id_field)]
    # Whole row groups before the offset are not even read.
    groups, row = [], 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if not groups and skip >= rows:
            skip -= rows
            row += rows
            yield rows
        else:
            groups.append(g)
    for frame in _frames(path, pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups, columns=wanted)):
        # tolist() gives Python ints and floats, not numpy scalars.
        values = [frame[c].tolist() for c in frame.columns]
        for cells in zip(*values):
            row += 1
            if skip:
                skip -= 1
                yield 1
                continue
            record = {c: _cell(v) for c, v in zip(frame.columns, cells)}
            yield RawRecord(row, row, record, None, record)


def _frames(path: Path, batches: Iterator[Any]) -> Iterator[Any]:
    """Each record batch as a pandas frame; a corrupt file is a DatasetError naming it."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
            raise DatasetError(f"{path}: cannot read parquet ({e})") from None
        yield batch.to_pandas()


def _cell(value: Any) -> Any:
    # pandas turns a null in a numeric column into NaN: it is a missing value, not a number.
    return None if isinstance(value, float) and math.isnan(value) else value


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq  # only parquet datasets pay for importing pyarrow
    open_binary(path).close()  # the same "file not found" as the other formats
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({e})") from None


def dir_files(path: Path) -> list[Path]:
    """The dataset files of a directory, by name, non-recursive."""
    if not path.is_dir():
        raise DatasetError(f"{path}: " + ("not a directory" if path.exists() else "directory not found"))
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()),
                   key=lambda p: p.name)
    if not files:
        raise DatasetError(f"{path}: no dataset files (" + ", ".join(SUFFIXES) + ") in the directory")
    return files


def read_file(path: Path, fmt: DatasetFormat, fields: Fields, skip: int) -> Iterator[RawRecord | int]:
    if fmt is DatasetFormat.JSONL:
        return read_jsonl(path, fields, skip)
    if fmt is DatasetFormat.TXT:
        return read_txt(path, fields, skip)
    if fmt in (DatasetFormat.CSV, DatasetFormat.TSV):
        return read_csv(path, fields, skip, "\t" if fmt is DatasetFormat.TSV else ",")
    if fmt is DatasetFormat.PARQUET:
        return read_parquet(path, fields, skip)
    raise DatasetError(f"{path}: format {fmt.value} is not a file format")


# ---------------------------------------------------------------- counting (for a progress-bar total)

def count_file(path: Path, fmt: DatasetFormat) -> int:
    """Records of one file, roughly: lines (blank ones too; csv/tsv less the header, a multi-line
    cell counting each line), parquet rows exactly. Bytes are counted, never parsed."""
    if fmt is DatasetFormat.PARQUET:
        return _parquet_file(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open_binary(path) as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    if fmt in (DatasetFormat.CSV, DatasetFormat.TSV):
        return max(0, lines - 1)
    return lines
