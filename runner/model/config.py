"""Model architecture description (`ModelConfig`) and the named presets.

One frozen dataclass covers every decoder the runner computes (OPT, LLaMA 1/2/3, SmolLM2,
Qwen2). What differs between families (norm kind and placement, MLP, biases, positions) is
an `Arch` value the layers read, so the model math branches on data, never on a family name:
a new LLaMA-like family is an `Arch` (or a preset) here plus its checkpoint name mapping in
`runner.model.weights`.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class Norm(str, enum.Enum):
    LAYER = "layer"  # LayerNorm: weight and bias
    RMS = "rms"  # RMSNorm: weight only


class Mlp(str, enum.Enum):
    # The MLPs runner.model.ops computes, each with its activation and its biases (or none):
    RELU = "relu"  # fc2(relu(fc1(x) + fc1_b)) + fc2_b
    SWIGLU = "swiglu"  # down(silu(gate(x)) * up(x)), gate and up fused as gate_up_w


class Positions(str, enum.Enum):
    LEARNED = "learned"  # a position embedding table added to the token embeddings
    ROPE = "rope"  # rotary embedding of q and k in every attention layer


@dataclass(frozen=True, kw_only=True)
class Arch:
    """What a decoder layer stack computes, apart from its sizes. The units of
    `runner.model.layers` read these fields (for their math and their weight shapes)."""
    norm: Norm
    norm_before: bool  # pre-LN (norm, then sublayer, then residual; plus a final norm) or post-LN
    mlp: Mlp
    qkv_bias: bool
    out_bias: bool  # the attention output projection's bias
    positions: Positions
    pos_offset: int = 0  # row of the learned table for position 0 (OPT's starts at 2)


OPT_ARCH = Arch(norm=Norm.LAYER, norm_before=True, mlp=Mlp.RELU, qkv_bias=True, out_bias=True,
                positions=Positions.LEARNED, pos_offset=2)
LLAMA_ARCH = Arch(norm=Norm.RMS, norm_before=True, mlp=Mlp.SWIGLU, qkv_bias=False, out_bias=False,
                  positions=Positions.ROPE)
QWEN2_ARCH = dataclasses.replace(LLAMA_ARCH, qkv_bias=True)  # LLaMA with q/k/v biases


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    norm_eps: float
    tie_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rope_theta: float = 10000.0  # read with Positions.ROPE
    word_embed_proj_dim: int | None = None  # opt-350m: 512, projected in/out of hidden

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


def _opt(name: str, hidden: int, layers: int, heads: int, *, post_ln: bool = False, **kw) -> ModelConfig:
    # Sizes from the OPT paper / facebook/opt-* config.json (ffn = 4 * hidden).
    return ModelConfig(
        name=name, arch=dataclasses.replace(OPT_ARCH, norm_before=not post_ln), vocab_size=50272, hidden_size=hidden,
        intermediate_size=4 * hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
        max_seq_len=2048, norm_eps=1e-5, tie_embeddings=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=1, **kw)


def _llama(name: str, hidden: int, layers: int, heads: int, ffn: int, *, kv_heads: int | None = None,
           vocab: int = 32000, max_len: int = 2048, theta: float = 10000.0, eps: float = 1e-6,
           tied: bool = False, bos: int = 1, eos: int = 2, arch: Arch = LLAMA_ARCH) -> ModelConfig:
    return ModelConfig(
        name=name, arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads, max_seq_len=max_len,
        norm_eps=eps, tie_embeddings=tied, rope_theta=theta, bos_token_id=bos, eos_token_id=eos)


PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    _opt("opt-125m", 768, 12, 12),
    _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, post_ln=True),
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
    # Qwen/Qwen2.5-0.5B config.json: a LLaMA layout with q/k/v biases
    _llama("qwen2.5-0.5b", 896, 24, 14, 4864, kv_heads=2, vocab=151936, max_len=32768, theta=1000000.0,
           tied=True, bos=151643, eos=151643, arch=QWEN2_ARCH),
]}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model.name: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
