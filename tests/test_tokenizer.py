"""Our GGUF tokenizer against transformers' tokenizer converted from the same file, and ByteTokenizer."""
from __future__ import annotations

import json

import pytest

from runner.model.tokenizer import ByteTokenizer, Tokenizer

SAMPLES = {
    "digits": "In 1815, 24 of 365 days",
    "unicode": "Café déjà vu — naïve façade; 東京 and Москва 🚀🎉 👩‍👩‍👧 ½ ∑x²",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n",
    "chatml_full": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n",
    "whitespace": "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "contractions": "I'm sure you'll see they've gone; it's Anne's DON'T",
    "specials_inline": "text<|endoftext|>more <|im_end|>",
}


@pytest.fixture(scope="module")
def ours(smollm2_loaded) -> Tokenizer:
    return smollm2_loaded[2]


def hf_ids(hf_tok, text: str) -> list[int]:
    return hf_tok(text, add_special_tokens=True)["input_ids"]


def test_prose_ids_match_transformers(ours, hf_smollm2_tokenizer, austen_text):
    assert len(austen_text) > 10_000
    ids = ours.encode(austen_text)
    assert ids == hf_ids(hf_smollm2_tokenizer, austen_text)
    assert len(ids) > 2_000


def test_prose_lines_match_transformers(ours, hf_smollm2_tokenizer, austen_text):
    for line in austen_text.split("\n\n")[:80]:
        assert ours.encode(line) == hf_ids(hf_smollm2_tokenizer, line), line[:60]


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_samples_match_transformers(ours, hf_smollm2_tokenizer, key):
    text = SAMPLES[key]
    assert ours.encode(text) == hf_ids(hf_smollm2_tokenizer, text)


def test_chatml_special_tokens_are_single_ids(ours):
    ids = ours.encode(SAMPLES["chatml"])
    assert ids[0] == 1 and ids[-2] == 2  # <|im_start|> ... <|im_end|>, matched whole
    assert ours.decode(ids, skip_special_tokens=False) == SAMPLES["chatml"]
    assert ours.decode(ids) == "user\nHi\n"


def test_round_trip(ours, austen_text):
    assert ours.decode(ours.encode(austen_text)) == austen_text
    for key in ("digits", "unicode", "whitespace", "contractions"):
        assert ours.decode(ours.encode(SAMPLES[key])) == SAMPLES[key]


def test_decode_matches_transformers(ours, hf_smollm2_tokenizer, austen_text):
    ids = ours.encode(austen_text[:3000] + SAMPLES["chatml"])
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_smollm2_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_ids_match_transformers(ours, hf_smollm2_tokenizer):
    hf = hf_smollm2_tokenizer
    ids = (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)
    assert ids == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.eos_token_ids == frozenset({2})
    assert ours.vocab_size == len(hf) == 49152
    assert not ours.add_bos  # the file says tokenizer.ggml.add_bos_token = false
    assert ours.encode("Hello")[0] != ours.bos_token_id


def test_from_file_round_trip(ours, tmp_path):
    """tokenizer.json + tokenizer_config.json beside it (HF directory layout)."""
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": True}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", extra_eos_ids=[0])
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, frozenset({0, 2}))
    text = SAMPLES["digits"]
    assert tok.encode(text) == [1, *ours.encode(text)]
    assert tok.decode(tok.encode(text)) == text


def test_from_file_fallback_ids_and_bad_file(ours, tmp_path):
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", bos_token_id=1, eos_token_id=2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


@pytest.mark.parametrize("text", ["", "hello world", SAMPLES["unicode"], "\x00\xff control \u200b"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials():
    tok = ByteTokenizer(add_bos=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.eos_token_ids == frozenset({2})
    ids = tok.encode("hi")
    assert ids == [1, ord("h") + 3, ord("i") + 3]
    # specials and ids beyond the byte range (a dummy model samples its whole vocab) are dropped
    assert tok.decode([0, *ids, 2, 300, 50000]) == "hi"


SP_SAMPLES = [
    "Anne Elliot was 27, naïve? 🚀 Captain Wentworth's letter",
    " leading space and  double  spaces\nnew line",
    "Kellynch Hall, in Somersetshire — 1760; ÆØÅ 東京",
    "<s>literal specials</s> inside",
]


def test_sentencepiece_gguf_tokenizer_matches_transformers(tiny_llama_ggufs, hf_tiny_gguf, austen_text):
    """tokenizer.ggml.model = llama (byte fallback, merges rebuilt from scores) on a trained 1000-token vocab."""
    from runner.model.gguf import read_gguf

    _, _, ours = read_gguf(tiny_llama_ggufs["gqa_tied_q8"])
    hf_tok = hf_tiny_gguf("gqa_tied_q8")[1]
    assert ours.add_bos and ours.bos_token_id == hf_tok.bos_token_id == 1 and ours.eos_token_id == hf_tok.eos_token_id
    for text in [*SP_SAMPLES, austen_text[:5000]]:
        ids = ours.encode(text)
        assert ids == hf_ids(hf_tok, text), text[:40]
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode(SP_SAMPLES[0])) == SP_SAMPLES[0]
