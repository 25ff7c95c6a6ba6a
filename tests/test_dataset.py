from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import AUSTEN
from runner.dataset import DatasetError, Prompt, load_prompts, reflow_paragraphs
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
        path.write_text(content, encoding="utf-8")
    return path


def test_jsonl_ids_lines_blank_lines_and_fallback_id(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"id": "a", "prompt": "Hello"}\n\n{"prompt": "No id here"}\n'
                                      '{"id": 7, "prompt": "Braces {x} stay", "extra": 1}\n')
    prompts = load_prompts(DatasetSpec(path=str(path)))
    assert prompts == [Prompt(id="a", text="Hello", line=1), Prompt(id="3", text="No id here", line=3),
                       Prompt(id="7", text="Braces {x} stay", line=4)]


def test_limit_and_template(tmp_path):
    path = write(tmp_path, "p.jsonl", "".join(json.dumps({"id": f"q{i}", "prompt": f"Q{i} {{}}"}) + "\n"
                                              for i in range(5)))
    spec = DatasetSpec(path=str(path), limit=2, template="<user>{prompt}</user>\n")
    prompts = load_prompts(spec)
    assert [p.id for p in prompts] == ["q0", "q1"]
    assert prompts[1].text == "<user>Q1 {}</user>\n"  # user braces are not format fields


def test_limit_stops_before_later_bad_lines(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{broken\n')
    assert len(load_prompts(DatasetSpec(path=str(path), limit=1))) == 1
    with pytest.raises(DatasetError):
        load_prompts(DatasetSpec(path=str(path)))


def test_custom_fields(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"key": "k1", "question": "Why?"}\n')
    prompts = load_prompts(DatasetSpec(path=str(path), field="question", id_field="key"))
    assert prompts == [Prompt(id="k1", text="Why?", line=1)]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', r"p.jsonl:2: invalid JSON \(Expecting property name"),
    ('{"prompt": "a"}\n\n{"id": "x"}\n', r"p.jsonl:3: missing field 'prompt'$"),
    ('["a list"]\n', r"p.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": 5}\n', r"p.jsonl:1: field 'prompt' must be a string, got 5"),
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
     r"p.jsonl:3: duplicate id 'a' \(first on line 1\)"),
    ('{"prompt": "fine"}\n{"prompt": "   "}\n', r"p.jsonl:2: empty prompt"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = write(tmp_path, "p.jsonl", content)
    with pytest.raises(DatasetError, match=message):
        load_prompts(DatasetSpec(path=str(path)))


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "p.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"p.jsonl:2: invalid UTF-8"):
        load_prompts(DatasetSpec(path=str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.jsonl: file not found"):
        load_prompts(DatasetSpec(path=str(tmp_path / "nope.jsonl")))


def test_csv_with_quoted_multiline_cell_and_row_number_ids(tmp_path):
    path = write(tmp_path, "p.csv", 'prompt,id,topic\n"Line one\nline two",,a\nSecond,s2,b\n\nThird,,c\n')
    prompts = load_prompts(DatasetSpec(path=str(path), template="Q: {prompt}"))
    assert prompts == [Prompt(id="1", text="Q: Line one\nline two", line=2),
                       Prompt(id="s2", text="Q: Second", line=4),
                       Prompt(id="3", text="Q: Third", line=6)]


def test_csv_missing_column_and_bad_row(tmp_path):
    path = write(tmp_path, "p.csv", "id,text\n1,hello\n")
    with pytest.raises(DatasetError, match=r"p.csv: column 'prompt' not found \(columns: id, text\)"):
        load_prompts(DatasetSpec(path=str(path)))
    path = write(tmp_path, "q.csv", "id,prompt\n1,hello\n2,a,b\n")
    with pytest.raises(DatasetError, match=r"q.csv:3: expected 2 columns, got 3"):
        load_prompts(DatasetSpec(path=str(path)))


def test_txt_one_prompt_per_line(tmp_path):
    path = write(tmp_path, "p.txt", "First prompt\n\n  \nSecond \\n not a newline\r\n")
    prompts = load_prompts(DatasetSpec(path=str(path)))
    assert prompts == [Prompt(id="1", text="First prompt", line=1),
                       Prompt(id="4", text="Second \\n not a newline", line=4)]


def test_shipped_prompt_set_loads():
    prompts = load_prompts(DatasetSpec(path=str(REPO / "jobs/data/prompts.jsonl")))
    assert [p.id for p in prompts] == [f"p{i:02d}" for i in range(1, 17)]
    assert all(5 <= len(p.text.split()) <= 60 for p in prompts)


def test_reflow_paragraphs():
    assert reflow_paragraphs("  a b\nc\n\n\nd\ne  \n") == "a b c\n\nd e"


def test_synthetic_austen_slices_are_exact_and_consecutive():
    tok = WhitespaceTokenizer()
    spec = DatasetSpec(path=str(AUSTEN), format="synthetic", prompt_len=32, num_prompts=5)
    prompts = load_prompts(spec, tok)
    assert [p.id for p in prompts] == [f"synthetic-{i}" for i in range(5)]
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
