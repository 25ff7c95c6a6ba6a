from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import AUSTEN
from runner.data.dataset import DatasetError, Prompt, Reject, count_records, iter_records, load_prompts, reflow_paragraphs
from runner.job import DatasetSpec

REPO = Path(__file__).resolve().parent.parent


class WhitespaceTokenizer:
    """A real (if tiny) tokenizer: one id per whitespace-separated word, vocabulary grown on demand."""

    def __init__(self, bos: bool = False) -> None:
        self.vocab: dict[str, int] = {"<s>": 0}
        self.words: list[str] = ["<s>"]
        self.bos = bos

    def encode(self, text: str) -> list[int]:
        ids = [0] if self.bos else []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def items(path: Path, **kw) -> list[Prompt | Reject]:
    return list(iter_records(DatasetSpec(path=str(path), **kw)))


def summary(records: list[Prompt | Reject]) -> list[tuple]:
    """(index, line, id, text or reason) of each record, Rejects marked."""
    return [(r.index, r.line, r.id, r.text) if isinstance(r, Prompt) else (r.index, r.line, r.id, "REJECT " + r.reason)
            for r in records]


def test_jsonl_ids_lines_blank_lines_and_fallback_id(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"id": "a", "prompt": "Hello"}\n\n{"prompt": "No id here"}\n'
                                      '{"id": 7, "prompt": "Braces {x} stay", "extra": 1}\n')
    src = str(path)
    assert load_prompts(DatasetSpec(path=src)) == [
        Prompt(id="a", text="Hello", line=1, index=0, source=src),
        Prompt(id="3", text="No id here", line=3, index=1, source=src),
        Prompt(id="7", text="Braces {x} stay", line=4, index=2, source=src)]


def test_bom_crlf_and_a_last_line_without_newline(tmp_path):
    path = write(tmp_path, "p.jsonl", b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b\\r"}')
    assert summary(items(path)) == [(0, 1, "1", "a"), (1, 3, "3", "b\r")]
    path = write(tmp_path, "p.csv", b'\xef\xbb\xbfid,prompt\r\nx,"two\r\nlines"\r\ny,last')
    assert summary(items(path)) == [(0, 2, "x", "two\r\nlines"), (1, 4, "y", "last")]


def test_template_named_fields_literal_braces_and_prompt_fallback(tmp_path):
    path = write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "question": "What is {x}?", "n": 3, "q": "ignored"},
        {"id": "b", "question": "Q2", "n": 1.5},
        {"id": "c", "n": 2},
        {"id": "d", "question": "Q4", "n": True},
        {"id": "e", "question": "  ", "n": 4}]))
    got = items(path, template="{{n}}={n} {{{question}}} Q: {prompt}", field="question")
    assert summary(got) == [(0, 1, "a", "{n}=3 {What is {x}?} Q: What is {x}?"),
                            (1, 2, "b", "{n}=1.5 {Q2} Q: Q2"),
                            (2, 3, "c", "REJECT missing field 'question'"),
                            (3, 4, "d", "REJECT field 'n' must be a string or number, got True"),
                            (4, 5, "e", "{n}=4 {  } Q:   ")]  # a number was inserted: not empty
    # {prompt} is the record's own "prompt" key when it has one.
    path = write(tmp_path, "q.jsonl", '{"prompt": "own", "question": "field"}\n{"question": "   "}\n')
    assert summary(items(path, template="<{prompt}>", field="question")) == [
        (0, 1, "1", "<own>"), (1, 2, "2", "REJECT empty prompt")]


def test_limit_and_template(tmp_path):
    path = write(tmp_path, "p.jsonl", "".join(json.dumps({"id": f"q{i}", "prompt": f"Q{i} {{}}"}) + "\n"
                                              for i in range(5)))
    prompts = load_prompts(DatasetSpec(path=str(path), limit=2, template="<user>{prompt}</user>\n"))
    assert [p.id for p in prompts] == ["q0", "q1"]
    assert prompts[1].text == "<user>Q1 {}</user>\n"  # user braces are not format fields


def test_limit_stops_before_later_bad_lines(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{broken\n')
    assert len(load_prompts(DatasetSpec(path=str(path), limit=1))) == 1
    with pytest.raises(DatasetError):
        load_prompts(DatasetSpec(path=str(path)))


def test_offset_and_limit_count_rejects_and_keep_absolute_indexes(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "r0"}\n{bad\n\n{"prompt": "r2"}\n{"prompt": ""}\n'
                                      '{"prompt": "r4"}\n{"prompt": "r5"}\n')
    # Records before the offset are not parsed: the bad line 2 is no Reject.
    assert summary(items(path, offset=2)) == [(2, 4, "4", "r2"), (3, 5, "5", "REJECT empty prompt"),
                                              (4, 6, "6", "r4"), (5, 7, "7", "r5")]
    assert summary(items(path, offset=1, limit=3)) == [(1, 2, None, "REJECT invalid JSON (Expecting property name "
                                                       "enclosed in double quotes)"),
                                                       (2, 4, "4", "r2"), (3, 5, "5", "REJECT empty prompt")]
    assert items(path, offset=7) == []


def test_custom_fields(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"key": "k1", "question": "Why?"}\n')
    assert summary(items(path, field="question", id_field="key")) == [(0, 1, "k1", "Why?")]


PLANTED_JSONL = (b'{"id": "g1", "prompt": "good one"}\n'
                 b'{"id": "x", "prompt": "a",}\n'                 # 2 invalid JSON
                 b'["a list"]\n'                                  # 3 not an object
                 b'{"id": "m", "question": "no prompt"}\n'        # 4 missing field
                 b'\n'
                 b'{"id": "n", "prompt": 3}\n'                    # 6 non-string
                 b'{"id": "e", "prompt": " \\t "}\n'              # 7 empty prompt
                 b'{"id": "u", "prompt": "caf\xe9"}\n'            # 8 invalid UTF-8
                 b'{"id": "g1", "prompt": "again"}\n'             # 9 duplicate id
                 b'{"id": 1.5, "prompt": "float id"}\n'           # 10 bad id type
                 b'{"id": 9, "prompt": "good two"}\n')


def test_planted_bad_jsonl_lines_are_rejects_and_good_ones_all_come_through(tmp_path):
    path = write(tmp_path, "bad.jsonl", PLANTED_JSONL)
    got = items(path)
    assert summary(got) == [
        (0, 1, "g1", "good one"),
        (1, 2, None, "REJECT invalid JSON (Expecting property name enclosed in double quotes)"),
        (2, 3, None, "REJECT expected a JSON object, got list"),
        (3, 4, "m", "REJECT missing field 'prompt'"),
        (4, 6, "n", "REJECT field 'prompt' must be a string, got 3"),
        (5, 7, "e", "REJECT empty prompt"),
        (6, 8, None, "REJECT invalid UTF-8 (invalid continuation byte at byte 27 of the line)"),
        (7, 9, "g1", "REJECT duplicate id 'g1'"),
        (8, 10, None, "REJECT field 'id' must be a string or integer, got 1.5"),
        (9, 11, "9", "good two")]
    bad = got[6]
    assert bad.excerpt == '{"id": "u", "prompt": "caf\ufffd"}' and bad.source == str(path)
    assert json.loads(bad.to_json()) == {"index": 6, "line": 8, "source": str(path), "id": None,
                                         "reason": bad.reason, "excerpt": bad.excerpt}
    assert bad.message() == f"{path}:8: {bad.reason}"
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: invalid JSON \(Expecting property name"):
        items(path, on_error="fail")
    with pytest.raises(DatasetError, match=r"^\S*bad.jsonl:8: invalid UTF-8"):
        items(path, on_error="fail", offset=6)


def test_planted_bad_csv_rows(tmp_path):
    path = write(tmp_path, "bad.csv", b'id,prompt,topic\n'
                                      b'g1,good one,a\n'
                                      b'short,row\n'                # 3 wrong column count
                                      b'e,"  ",b\n'                 # 4 empty prompt
                                      b'u,caf\xe9,c\n'              # 5 invalid UTF-8
                                      b'\n'
                                      b'g1,"again\nover lines",d\n'   # 7 duplicate id
                                      b',no id,e\n')                # 9 fallback id: data row 6
    assert summary(items(path)) == [
        (0, 2, "g1", "good one"), (1, 3, None, "REJECT expected 3 columns, got 2"),
        (2, 4, "e", "REJECT empty prompt"),
        (3, 5, None, "REJECT invalid UTF-8 (invalid continuation byte at byte 6 of line 5)"),
        (4, 7, "g1", "REJECT duplicate id 'g1'"), (5, 9, "6", "no id")]
    assert items(path)[4].excerpt == 'g1,"again\nover lines",d'
    with pytest.raises(DatasetError, match=r"bad.csv:3: expected 3 columns, got 2$"):
        items(path, on_error="fail")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', r"p.jsonl:2: invalid JSON \(Expecting property name"),
    ('{"prompt": "a"}\n\n{"id": "x"}\n', r"p.jsonl:3: missing field 'prompt'$"),
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
     r"p.jsonl:3: duplicate id 'a'$"),
])
def test_load_prompts_raises_at_the_first_bad_record(tmp_path, content, message):
    path = write(tmp_path, "p.jsonl", content)
    with pytest.raises(DatasetError, match=message):
        load_prompts(DatasetSpec(path=str(path)))


def test_duplicates_found_across_the_hash_buffer_merges(tmp_path):
    ids = [f"id{i}" for i in range(150_000)] + ["id3", "id149999", "id70000"]
    path = write(tmp_path, "p.jsonl", "".join(f'{{"id": "{i}", "prompt": "x"}}\n' for i in ids))
    rejects = [r for r in iter_records(DatasetSpec(path=str(path))) if isinstance(r, Reject)]
    assert [(r.index, r.reason) for r in rejects] == [(150_000, "duplicate id 'id3'"),
                                                      (150_001, "duplicate id 'id149999'"),
                                                      (150_002, "duplicate id 'id70000'")]


def test_unreadable_datasets_are_errors_naming_the_path(tmp_path):
    for name, message in [("nope.jsonl", "nope.jsonl: file not found"), ("nope.parquet", "nope.parquet: file not found")]:
        with pytest.raises(DatasetError, match=message):
            items(tmp_path / name)
    with pytest.raises(DatasetError, match=r"notes.parquet: cannot read parquet"):
        items(write(tmp_path, "notes.parquet", "not parquet"))
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "readme.md", "x")
    with pytest.raises(DatasetError, match=r"empty: no dataset files \(.jsonl"):
        items(tmp_path / "empty", format="dir")
    with pytest.raises(DatasetError, match=r"gone: directory not found"):
        items(tmp_path / "gone", format="dir")


def test_csv_with_quoted_multiline_cell_and_row_number_ids(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt,id,topic\n"Line one\nline two",,a\nSecond,s2,b\n\nThird,,c\n')
    assert summary(items(path, template="Q: {prompt} ({topic})")) == [
        (0, 2, "1", "Q: Line one\nline two (a)"), (1, 4, "s2", "Q: Second (b)"), (2, 6, "3", "Q: Third (c)")]


def test_csv_missing_column_is_an_error_up_front(tmp_path):
    path = write(tmp_path, "p.csv", "id,text\n1,hello\n")
    with pytest.raises(DatasetError, match=r"p.csv: column 'prompt' not found \(columns: id, text\)"):
        items(path, on_error="skip")
    with pytest.raises(DatasetError, match=r"p.csv: column 'topic' not found"):
        items(path, template="{text} {topic}")
    with pytest.raises(DatasetError, match=r"empty.csv: empty file"):
        items(write(tmp_path, "empty.csv", "\n"))


def test_tsv(tmp_path):
    path = write(tmp_path, "p.tsv", 'id\tquestion\n1\tWhat, with commas?\n\n2\t"quoted\ttab"\n')
    assert summary(items(path, field="question")) == [(0, 2, "1", "What, with commas?"), (1, 4, "2", "quoted\ttab")]


def test_parquet_through_pandas_with_row_groups_offset_and_nulls(tmp_path):
    path = tmp_path / "p.parquet"
    frame = pd.DataFrame({"id": [10, 11, None, 13, 14], "question": ["a", "b", "c", None, "e"],
                          "n": [1, 2, 3, 4, 5], "unused": [[1], [2], [3], [4], [5]]})
    frame.to_parquet(path, row_group_size=2)
    # A null id (NaN in pandas) falls back to the row; a float id column is no id.
    assert summary(items(path, template="{question}#{n}")) == [
        (0, 1, None, "REJECT field 'id' must be a string or integer, got 10.0"),
        (1, 2, None, "REJECT field 'id' must be a string or integer, got 11.0"),
        (2, 3, "3", "c#3"), (3, 4, None, "REJECT field 'id' must be a string or integer, got 13.0"),
        (4, 5, None, "REJECT field 'id' must be a string or integer, got 14.0")]
    frame.assign(id=["r0", "r1", "r2", "r3", "r4"]).to_parquet(path, row_group_size=2)
    assert summary(items(path, field="question", offset=3)) == [
        (3, 4, "r3", "REJECT field 'question' must be a string, got None"), (4, 5, "r4", "e")]
    assert summary(items(path, template="{question}:{n}", offset=1, limit=2)) == [(1, 2, "r1", "b:2"),
                                                                                  (2, 3, "r2", "c:3")]
    assert items(path, field="question")[3].excerpt == '{"id": "r3", "question": null}'
    with pytest.raises(DatasetError, match=r"p.parquet: column 'topic' not found \(columns: id, question, n, unused"):
        items(path, template="{topic}")


def test_dir_mixes_formats_in_name_order_with_file_qualified_fallback_ids(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d, "b.csv", "prompt\nfrom csv\n")
    write(d, "a.jsonl", '{"prompt": "first"}\n{"id": "k", "prompt": "second"}\n')
    write(d, "d.txt", "from txt\n\nagain txt\n")
    write(d, "notes.md", "not a dataset\n")
    pd.DataFrame({"prompt": ["from parquet"]}).to_parquet(d / "c.parquet")
    got = items(d)
    assert summary(got) == [(0, 1, "a.jsonl:1", "first"), (1, 2, "k", "second"), (2, 2, "b.csv:1", "from csv"),
                            (3, 1, "c.parquet:1", "from parquet"), (4, 1, "d.txt:1", "from txt"),
                            (5, 3, "d.txt:3", "again txt")]
    assert [Path(p.source).name for p in got] == ["a.jsonl", "a.jsonl", "b.csv", "c.parquet", "d.txt", "d.txt"]
    # The offset runs across files: the first three records (two files) are skipped.
    assert summary(items(d, offset=3, limit=2)) == [(3, 1, "c.parquet:1", "from parquet"),
                                                    (4, 1, "d.txt:1", "from txt")]
    assert count_records(DatasetSpec(path=str(d))) == 2 + 1 + 1 + 3
    with pytest.raises(DatasetError, match=r"d.txt: a txt dataset has only the field 'prompt'"):
        items(d / "d.txt", template="{prompt} {topic}")


def test_txt_one_prompt_per_line(tmp_path):
    path = write(tmp_path, "p.txt", "First prompt\n\n  \nSecond \\n not a newline\r\n\xff\n")
    assert summary(items(path, template="[{prompt}]")) == [(0, 1, "1", "[First prompt]"),
                                                           (1, 4, "4", "[Second \\n not a newline]"),
                                                           (2, 5, "5", "[\xff]")]


def test_count_records_per_format(tmp_path):
    jsonl = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}')
    assert count_records(DatasetSpec(path=str(jsonl))) == 3
    assert count_records(DatasetSpec(path=str(jsonl), offset=1)) == 2
    assert count_records(DatasetSpec(path=str(jsonl), limit=1)) == 1
    assert count_records(DatasetSpec(path=str(jsonl), offset=5)) == 0
    assert count_records(DatasetSpec(path=str(write(tmp_path, "p.txt", "a\nb\n")))) == 2
    assert count_records(DatasetSpec(path=str(write(tmp_path, "p.csv", "prompt\na\nb\nc\n")))) == 3
    assert count_records(DatasetSpec(path=str(write(tmp_path, "p.tsv", "prompt\tid\na\t1\n")))) == 1
    pd.DataFrame({"prompt": ["x"] * 7}).to_parquet(tmp_path / "p.parquet", row_group_size=3)
    assert count_records(DatasetSpec(path=str(tmp_path / "p.parquet"), offset=2)) == 5
    synthetic = DatasetSpec(path=str(AUSTEN), format="synthetic", prompt_len=8, num_prompts=4, limit=3)
    assert count_records(synthetic) == 3
    assert count_records(DatasetSpec(path=str(AUSTEN), format="synthetic", prompt_len=8)) is None
    assert count_records(DatasetSpec(path=str(AUSTEN), format="synthetic", prompt_len=8), default_count=6) == 6


_STREAM_CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
from runner.data.dataset import Prompt, iter_records
from runner.data.spec import DatasetSpec
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t1 = time.perf_counter()
records = iter_records(DatasetSpec(path=sys.argv[1]))
first = next(records)
out = {"import_s": t1 - t0, "first_s": time.perf_counter() - t1, "prompts": isinstance(first, Prompt)}
n = 1
for item in records:
    n += 1
    out["prompts"] &= type(item) is Prompt
    if n == 100_000:
        out["rss_100k"] = rss()
out.update(n=n, rss_end=rss(), total_s=time.perf_counter() - t1)
print(json.dumps(out))
"""


def test_a_million_line_jsonl_streams_in_flat_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, 1_000_000, 50_000):
            f.write("".join(f'{{"id": "row-{i}", "prompt": "Question {i}: what comes after {i}?"}}\n'
                            for i in range(start, start + 50_000)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    growth_mb = (out["rss_end"] - out["rss_100k"]) / 2**20
    print(f"\nstreaming 1M jsonl: first record {out['first_s']:.3f} s (imports {out['import_s']:.2f} s), "
          f"all {out['total_s']:.1f} s, RSS {out['rss_100k'] / 2**20:.1f} MB at 100k -> "
          f"{out['rss_end'] / 2**20:.1f} MB at 1M (+{growth_mb:.1f} MB)")
    assert out["n"] == 1_000_000 and out["prompts"]
    assert out["first_s"] < 2
    assert growth_mb < 40


def test_shipped_prompt_set_loads():
    prompts = load_prompts(DatasetSpec(path=str(REPO / "jobs/data/prompts.jsonl")))
    assert [p.id for p in prompts] == [f"p{i:02d}" for i in range(1, 17)]
    assert all(5 <= len(p.text.split()) <= 60 for p in prompts)


def test_reflow_paragraphs():
    assert reflow_paragraphs("  a b\nc\n\n\nd\ne  \n") == "a b c\n\nd e"


def test_synthetic_austen_slices_are_exact_and_consecutive():
    tok = WhitespaceTokenizer()
    spec = DatasetSpec(path=str(AUSTEN), format="synthetic", prompt_len=32, num_prompts=5)
    prompts = list(iter_records(spec, tok))
    assert [(p.id, p.index, p.line, p.source) for p in prompts] == [
        (f"synthetic-{i}", i, i + 1, str(AUSTEN)) for i in range(5)]
    ids = WhitespaceTokenizer().encode(reflow_paragraphs(AUSTEN.read_text(encoding="utf-8")))
    assert all(len(p.token_ids) == 32 for p in prompts)
    # Consecutive, non-overlapping: concatenated slices are exactly the head of the text.
    assert [t for p in prompts for t in p.token_ids] == ids[:160]
    assert prompts[0].text.startswith("Persuasion by Jane Austen (1818) Chapter 1 Sir Walter Elliot")
    assert tok.encode(prompts[1].text) == list(prompts[1].token_ids)


def test_synthetic_wraps_around_and_honours_limit(tmp_path):
    path = write(tmp_path, "short.txt", "one two\nthree\n\nfour five\n")
    prompts = load_prompts(DatasetSpec(path=str(path), format="synthetic", prompt_len=3, num_prompts=3),
                           WhitespaceTokenizer())
    assert [p.text for p in prompts] == ["one two three", "four five one", "two three four"]
    limited = load_prompts(DatasetSpec(path=str(path), format="synthetic", prompt_len=3, num_prompts=3, limit=1),
                           WhitespaceTokenizer())
    assert len(limited) == 1


def test_synthetic_drops_the_bos_that_encode_adds(tmp_path):
    path = write(tmp_path, "short.txt", "a b c d\n")
    prompts = load_prompts(DatasetSpec(path=str(path), format="synthetic", prompt_len=2, num_prompts=2),
                           WhitespaceTokenizer(bos=True))
    assert [p.text for p in prompts] == ["a b", "c d"]
    assert [p.token_ids for p in prompts] == [(1, 2), (3, 4)]


def test_synthetic_needs_a_tokenizer(tmp_path):
    path = write(tmp_path, "short.txt", "words here\n")
    with pytest.raises(DatasetError, match="needs a tokenizer"):
        load_prompts(DatasetSpec(path=str(path), format="synthetic", prompt_len=2, num_prompts=1))
