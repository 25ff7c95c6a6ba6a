"""runner/data/formats.py: record readers on real files (more through runner.data.dataset in test_dataset.py)."""
from __future__ import annotations

from pathlib import Path

from runner.data.formats import Fields, read_csv

FIELDS = Fields(names=("prompt",), field="prompt", id_field="id")


def _read(path: Path, delimiter: str = ",") -> list[tuple]:
    return [(r.line, r.record["prompt"] if r.record else None, r.error) for r in read_csv(path, FIELDS, 0, delimiter)]


def test_an_unterminated_quote_is_one_reject_and_the_rows_after_it_still_read(tmp_path):
    # The quote opened on line 5 never closes: csv alone would read lines 5-8 as one cell of row "b".
    path = tmp_path / "p.csv"
    path.write_text('id,prompt\na,first\nd,"two\nlines"\nb,"never closed\nc,third\n\ne,last\n')
    records = _read(path)
    assert [line for line, _, _ in records] == [2, 3, 5, 6, 8]
    assert records[:2] == [(2, "first", None), (3, "two\nlines", None)]  # a closed multi-line cell is fine
    assert records[2][1] is None and "unterminated quote" in records[2][2]
    assert records[3:] == [(6, "third", None), (8, "last", None)]
    last = tmp_path / "q.csv"
    last.write_text('id,prompt\na,first\nb,"the end')  # on the last line, without a newline
    assert [(line, text) for line, text, _ in _read(last)] == [(2, "first"), (3, None)]


def test_an_unterminated_quote_in_tsv_and_a_file_ending_without_newline(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text('id\tprompt\na\t"open\nb\tsecond')
    records = _read(path, "\t")
    assert [(line, text) for line, text, _ in records] == [(2, None), (3, "second")]
    plain = tmp_path / "q.csv"
    plain.write_text("id,prompt\na,no newline at the end")
    assert _read(plain) == [(2, "no newline at the end", None)]
