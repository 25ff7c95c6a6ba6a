"""Model architecture description (`ModelConfig`) and the named presets.

One frozen dataclass covers both families the ALISA paper runs (OPT and LLaMA); the
family-specific switches (post-LN, project_in/out, RoPE, GQA, tied embeddings) are
plain fields so the model math can branch on data instead of on class hierarchies.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class Family(str, enum.Enum):
    OPT = "opt"
    LLAMA = "llama"


class Activation(str, enum.Enum):
    RELU = "relu"
    SILU = "silu"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    norm_eps: float
    activation: Activation
    tie_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # LLaMA
    rope_theta: float = 10000.0
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None  # opt-350m: 512, projected in/out of hidden
    pos_offset: int = 2  # OPT's learned positions start at index 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model {self.name}: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name}: num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (differs from hidden only for opt-350m)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _opt(name: str, hidden: int, layers: int, heads: int, **kw) -> ModelConfig:
    # Sizes from the OPT paper / facebook/opt-* config.json (ffn = 4 * hidden).
    return ModelConfig(
        name=name, family=Family.OPT, vocab_size=50272, hidden_size=hidden,
        intermediate_size=4 * hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
        max_seq_len=2048, norm_eps=1e-5, activation=Activation.RELU, tie_embeddings=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=1, **kw)


def _llama(name: str, hidden: int, layers: int, heads: int, ffn: int, *, kv_heads: int | None = None,
           vocab: int = 32000, max_len: int = 2048, theta: float = 10000.0, eps: float = 1e-6,
           tied: bool = False, bos: int = 1, eos: int = 2) -> ModelConfig:
    return ModelConfig(
        name=name, family=Family.LLAMA, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads, max_seq_len=max_len,
        norm_eps=eps, activation=Activation.SILU, tie_embeddings=tied, rope_theta=theta,
        bos_token_id=bos, eos_token_id=eos)


PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    _opt("opt-125m", 768, 12, 12),
    _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    _opt("opt-1.3b", 2048, 24, 32),
    _opt("opt-2.7b", 2560, 32, 32),
    _opt("opt-6.7b", 4096, 32, 32),
    _opt("opt-13b", 5120, 40, 40),
    _opt("opt-30b", 7168, 48, 56),
    _opt("opt-66b", 9216, 64, 72),
    _opt("opt-175b", 12288, 96, 96),
    _llama("llama-7b", 4096, 32, 32, 11008),
    _llama("llama-13b", 5120, 40, 40, 13824),
    _llama("llama-33b", 6656, 60, 52, 17920),
    _llama("llama-65b", 8192, 80, 64, 22016),
    _llama("llama2-7b", 4096, 32, 32, 11008, max_len=4096, eps=1e-5),
    _llama("llama2-13b", 5120, 40, 40, 13824, max_len=4096, eps=1e-5),
    _llama("llama2-70b", 8192, 80, 64, 28672, kv_heads=8, max_len=4096, eps=1e-5),
    _llama("llama3-8b", 4096, 32, 32, 14336, kv_heads=8, vocab=128256, max_len=8192, theta=500000.0,
           eps=1e-5, bos=128000, eos=128001),
    _llama("llama3-70b", 8192, 80, 64, 28672, kv_heads=8, vocab=128256, max_len=8192, theta=500000.0,
           eps=1e-5, bos=128000, eos=128001),
    _llama("smollm2-135m", 576, 30, 9, 1536, kv_heads=3, vocab=49152, max_len=8192, theta=100000.0,
           eps=1e-5, tied=True, bos=1, eos=2),
]}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model.name: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
