"""Text <-> token ids: a thin wrapper over a `tokenizers.Tokenizer`, and a byte fallback.

The runner only needs encode/decode plus the special ids, so both classes expose the same
small surface. BOS is added by `encode` itself (never by the backend's post-processor), so
whether a prompt starts with BOS is decided in one place, from the model's own config.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# llama.cpp's `tokenizer.ggml.token_type` values we act on.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the add-BOS rule of its model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, extra_eos_ids: Iterable[int] = (), add_bos: bool = False):
        if add_bos and bos_token_id is None:
            raise ValueError("tokenizer: add_bos is set but there is no bos token")
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        eos = {eos_token_id} if eos_token_id is not None else set()
        self.eos_token_ids: frozenset[int] = frozenset(eos | set(extra_eos_ids))
        self.add_bos = add_bos
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @classmethod
    def from_file(cls, path: str | Path, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """A Hugging Face `tokenizer.json`, with `tokenizer_config.json` / `special_tokens_map.json`
        beside it naming the special tokens. The id arguments are fallbacks (e.g. from the model's
        config.json) for tokens those files do not name."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions on malformed files
            raise ValueError(f"tokenizer: cannot read {path}: {e}") from None
        return cls._with_side_configs(backend, path.parent, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id, extra_eos_ids=extra_eos_ids)

    @classmethod
    def from_vocab_merges(cls, vocab_path: str | Path, merges_path: str | Path, **ids: Any) -> Tokenizer:
        """GPT-2 style `vocab.json` + `merges.txt` (what facebook/opt-* ships instead of tokenizer.json)."""
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        config = _read_json(Path(vocab_path).parent / "tokenizer_config.json")
        specials = [t for t in (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token")) if t]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials
                                    if backend.token_to_id(t) is not None])
        return cls._with_side_configs(backend, Path(vocab_path).parent, **ids)

    @classmethod
    def _with_side_configs(cls, backend: tokenizers.Tokenizer, folder: Path, *, bos_token_id: int | None,
                           eos_token_id: int | None, pad_token_id: int | None,
                           extra_eos_ids: Iterable[int]) -> Tokenizer:
        # special_tokens_map.json is older; tokenizer_config.json wins where both name a token.
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}

        def special(key: str, fallback: int | None) -> int | None:
            token = _token_content(config.get(key))
            found = backend.token_to_id(token) if token else None
            return found if found is not None else fallback

        bos = special("bos_token", bos_token_id)
        eos = special("eos_token", eos_token_id)
        pad = special("pad_token", pad_token_id)
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"]) and bos is not None
        else:
            # No explicit flag: do what the backend's post-processor would (Llama-3 style files add BOS there).
            first = backend.encode("a", add_special_tokens=True).ids[:1]
            plain = backend.encode("a", add_special_tokens=False).ids[:1]
            add_bos = bos is not None and first == [bos] != plain
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, extra_eos_ids=extra_eos_ids,
                   add_bos=add_bos)

    @classmethod
    def byte_level_bpe(cls, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
                       bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None = None,
                       extra_eos_ids: Iterable[int] = (), add_bos: bool = False) -> Tokenizer:
        """GPT-2 style byte-level BPE from a GGUF vocabulary (`tokenizer.ggml.model == "gpt2"`).

        Built the way transformers builds it from the same file (integrations/gguf), so ids agree:
        ByteLevel pre-tokenizer with the GPT-2 regex and no prefix space, CONTROL tokens special.
        """
        alphabet = _byte_alphabet()
        spelling = _bytes_to_unicode()
        # A token spelled outside the byte alphabet is written as raw text; respell it byte by byte.
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                                  end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        # A CONTROL token using characters outside the byte alphabet is a llama.cpp mislabel; skip it.
        _add_marked_tokens(backend, tokens, token_types, lambda t: set(t) <= alphabet)
        return cls(backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   extra_eos_ids=extra_eos_ids, add_bos=add_bos)

    @classmethod
    def sentencepiece_bpe(cls, tokens: Sequence[str], scores: Sequence[float] | None, merges: Sequence[str] | None,
                          token_types: Sequence[int], *, unk_token_id: int | None, bos_token_id: int | None,
                          eos_token_id: int | None, pad_token_id: int | None = None,
                          extra_eos_ids: Iterable[int] = (), add_bos: bool = True) -> Tokenizer:
        """SentencePiece-style BPE (`tokenizer.ggml.model == "llama"`), as transformers' LlamaTokenizer
        builds it: Metaspace pre-tokenizer prepending "▁" to the first word, byte fallback."""
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
        elif scores is not None:
            pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
        else:
            raise ValueError("tokenizer: sentencepiece vocabulary has neither merges nor scores")
        unk = tokens[unk_token_id] if unk_token_id is not None else None
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                                                  byte_fallback=True, dropout=None))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1, right=0)])
        _add_marked_tokens(backend, tokens, token_types, lambda t: True)
        return cls(backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   extra_eos_ids=extra_eos_ids, add_bos=add_bos)


class ByteTokenizer:
    """Tokenizer for models without one (dummy weights): id = utf-8 byte + 3; 0 pad, 1 bos, 2 eos."""

    OFFSET = 3

    def __init__(self, *, add_bos: bool = False):
        self.pad_token_id: int | None = 0
        self.bos_token_id: int | None = 1
        self.eos_token_id: int | None = 2
        self.eos_token_ids: frozenset[int] = frozenset({2})
        self.vocab_size: int = 256 + self.OFFSET
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [1, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # A dummy model samples any id in its (much larger) vocab; ids that are not bytes are dropped.
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


def _add_marked_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], token_types: Sequence[int],
                       keep_control: Any) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens, so both
    are matched whole in text instead of being cut into pieces (as transformers and llama.cpp do)."""
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, token_types)
               if k == TOKEN_TYPE_CONTROL and keep_control(t)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, token_types)
            if k == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary: every split of a token into two known pieces,
    best score first (same order as transformers' `generate_merges`, so ties break the same way)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_bytes_to_unicode().values())


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer: cannot parse {path}: {e}") from None
    return data if isinstance(data, dict) else {}
