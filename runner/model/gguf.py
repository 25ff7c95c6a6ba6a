"""Load a llama.cpp GGUF file (LLaMA architecture) into a `ModelConfig`, canonical weights and a tokenizer.

The header is parsed here directly from a memory map rather than with `gguf.GGUFReader`: the
reader turns every vocabulary string into numpy field parts, which alone takes ~4 s for a
49k-token vocabulary. Dequantization itself is `gguf.quants.dequantize`, which matches the
weights transformers loads from the same file bit for bit.
"""
from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from runner.model.config import LLAMA_ARCH, ModelConfig
from runner.model.int8 import Int8Weight
from runner.model.layers import LINEAR_WEIGHTS, weight_shapes
from runner.model.lazy import LazyWeights
from runner.model.tokenizer import Tokenizer

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's default when general.alignment is absent

# Metadata value types of the GGUF spec: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9

# Only float tensors are model weights; integer tensor types would dequantize to garbage.
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dims fastest-first: ne = reversed(shape))
    qtype: GGMLQuantizationType
    offset: int  # absolute file offset of the first byte


@dataclass(frozen=True, kw_only=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              with_weights: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, canonical weights (see `runner.model.layers.weight_shapes`; empty unless `with_weights`)
    and tokenizer of a LLaMA GGUF file."""
    cfg, weights, tokenizer = read_gguf_lazy(path, dtype, with_weights=with_weights)
    return cfg, weights.materialize(), tokenizer


def read_gguf_lazy(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   with_weights: bool = True, int8_linears: bool = False) -> tuple[ModelConfig, LazyWeights, Tokenizer]:
    """`read_gguf` with weights dequantized one fused tensor per lookup, from the file's memory map
    (which lives as long as the returned weights do). With `int8_linears` (`model.weight_bits: 8`), a
    layer linear stored as Q8_0 is read as it is stored, an `Int8Weight` with a scale per block of 32
    (no float round trip), not dequantized."""
    path = Path(path)
    with path.open("rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the file object
    gguf = parse_gguf(buf, path)
    cfg = gguf_config(gguf)
    tokenizer = gguf_tokenizer(gguf.metadata, path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens "
                         f"but the vocabulary lists {cfg.vocab_size}")
    if not with_weights:
        return cfg, LazyWeights({}, {}, dtype=dtype, device=device), tokenizer
    return cfg, _canonical_weights(buf, gguf, cfg, dtype, device, int8_linears), tokenizer


def parse_gguf(buf: mmap.mmap | bytes, path: Path) -> GGUFFile:
    """Metadata and tensor table of a GGUF v2/v3 file (tensor data stays in `buf`)."""
    if buf[:4] != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (bad magic bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, vtype, path, key)
    infos = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown ggml type id {qtype_id}") from None
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    align = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = (pos + align - 1) // align * align
    tensors = {n: TensorInfo(name=n, shape=s, qtype=q, offset=data_start + o) for n, s, q, o in infos}
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _read_string(buf: mmap.mmap | bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n


def _read_value(buf: mmap.mmap | bytes, pos: int, vtype: int, path: Path, key: str) -> tuple[Any, int]:
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype != _ARRAY:
        raise ValueError(f"{path}: metadata {key} has unknown value type {vtype}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[etype]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
        return values, pos + count * struct.calcsize(fmt)
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, etype, path, key)
        values.append(value)
    return values, pos


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """`ModelConfig` from llama.cpp's `llama.*` metadata; rejects what the runner cannot compute."""
    md, path = gguf.metadata, gguf.path
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")

    def need(key: str) -> Any:
        if f"llama.{key}" not in md:
            raise ValueError(f"{path}: metadata llama.{key} is missing")
        return md[f"llama.{key}"]

    if md.get("llama.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts (llama.expert_count) is not supported")
    scaling = md.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = hidden // heads
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if md.get(f"llama.{key}", head_dim) != head_dim:
            raise ValueError(f"{path}: llama.{key} = {md[f'llama.{key}']} but hidden/heads = {head_dim}; unsupported")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: metadata tokenizer.ggml.tokens is missing")
    return ModelConfig(
        name=str(md.get("general.name") or path.stem), arch=LLAMA_ARCH, vocab_size=len(tokens),
        hidden_size=hidden, intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(md.get("llama.attention.head_count_kv", heads)),
        max_seq_len=int(need("context_length")), norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        rope_theta=float(md.get("llama.rope.freq_base", 10000.0)))


def gguf_tokenizer(md: dict[str, Any], path: Path) -> Tokenizer:
    """The tokenizer embedded in the metadata, built like transformers' GGUF tokenizer conversion."""
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens") or []
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # eot/eom mark end-of-turn tokens (e.g. Llama 3's <|eot_id|>): generation should stop there too.
    extra_eos = [md[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in md]
    ids = dict(bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
               pad_token_id=md.get("tokenizer.ggml.padding_token_id"), extra_eos_ids=extra_eos)
    if kind == "gpt2":
        return Tokenizer.byte_level_bpe(tokens, md.get("tokenizer.ggml.merges") or [], types,
                                        add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)), **ids)
    if kind == "llama":
        # Older sentencepiece files carry no flag; llama.cpp (and transformers) then add BOS.
        return Tokenizer.sentencepiece_bpe(tokens, md.get("tokenizer.ggml.scores"), md.get("tokenizer.ggml.merges"),
                                           types, unk_token_id=md.get("tokenizer.ggml.unknown_token_id"),
                                           add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)), **ids)
    raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' and 'llama')")


def dequantize_tensor(buf: mmap.mmap | bytes, info: TensorInfo, path: Path) -> np.ndarray:
    """float32 array of `info.shape` (a fresh copy, not a view of the file)."""
    if info.qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"{path}: tensor {info.name} has ggml type {info.qtype.name}, which cannot be dequantized")
    block, block_bytes = GGML_QUANT_SIZES[info.qtype]
    rows, cols = int(np.prod(info.shape[:-1], dtype=np.int64)), info.shape[-1]
    if cols % block:
        raise ValueError(f"{path}: tensor {info.name} row length {cols} "
                         f"is not a multiple of the {info.qtype.name} block {block}")
    row_bytes = cols // block * block_bytes
    raw = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=info.offset).reshape(rows, row_bytes)
    if info.qtype not in _FLOAT_TYPES and block == 1:
        raise ValueError(f"{path}: tensor {info.name} has integer type {info.qtype.name}; expected float or quantized")
    try:
        out = dequantize(raw, info.qtype)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {info.name}: ggml type {info.qtype.name} "
                         "is not supported by gguf.quants") from None
    # F32 comes back as a read-only view of the file; the returned array must outlive the map.
    if out.dtype != np.float32 or np.may_share_memory(out, raw):
        out = out.astype(np.float32)  # astype always copies
    return out.reshape(info.shape)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time q/k row permutation (interleaved rotary pairs -> HF rotate-half halves)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_LAYER_PARTS = {  # GGUF per-block tensor -> (canonical name, position in the fused tensor)
    "attn_norm": ("attn.ln_w", 0), "attn_q": ("attn.qkv_w", 0), "attn_k": ("attn.qkv_w", 1),
    "attn_v": ("attn.qkv_w", 2), "attn_output": ("attn.o_w", 0), "ffn_norm": ("mlp.ln_w", 0),
    "ffn_gate": ("mlp.gate_up_w", 0), "ffn_up": ("mlp.gate_up_w", 1), "ffn_down": ("mlp.down_w", 0),
}
_GLOBAL_PARTS = {"token_embd": "embed.tok_w", "output_norm": "head.ln_w", "output": "head.lm_w"}


def _canonical_name(gguf_name: str, path: Path) -> tuple[str, int]:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix == "weight" and base in _GLOBAL_PARTS:
        return _GLOBAL_PARTS[base], 0
    parts = base.split(".")
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_PARTS:
        name, index = _LAYER_PARTS[parts[2]]
        return f"layers.{int(parts[1])}.{name}", index
    if base == "rope_freqs":
        raise ValueError(f"{path}: tensor rope_freqs (rope scaling, e.g. Llama 3.1) is not supported")
    raise ValueError(f"{path}: unexpected tensor {gguf_name} for a llama model")


def _canonical_weights(buf: mmap.mmap, gguf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                       device: torch.device | str, int8_linears: bool = False) -> LazyWeights:
    """The file's tensors under canonical names, fused parts in order, shapes checked before any is read.
    A lookup dequantizes one fused weight: only its parts are ever held twice."""
    groups: dict[str, dict[int, TensorInfo]] = {}
    for info in gguf.tensors.values():
        name, index = _canonical_name(info.name, gguf.path)
        groups.setdefault(name, {})[index] = info
    parts, shapes = {}, {}
    for name, infos in groups.items():
        if sorted(infos) != list(range(len(infos))):
            raise ValueError(f"{gguf.path}: {name} is missing some of its fused parts (have parts {sorted(infos)})")
        ordered = [infos[i] for i in range(len(infos))]
        read = _read_part
        if int8_linears and _int8_linear(name) and all(i.qtype is GGMLQuantizationType.Q8_0 for i in ordered):
            read = _read_q8_0
        parts[name] = [functools.partial(read, buf, info, cfg, dtype, gguf.path) for info in ordered]
        shapes[name] = (sum(i.shape[0] for i in ordered), *ordered[0].shape[1:])
    aliases = {}
    if cfg.tie_embeddings and "embed.tok_w" in shapes and "head.lm_w" not in shapes:
        aliases["head.lm_w"] = "embed.tok_w"  # tied: one tensor, read once by `materialize`
        shapes["head.lm_w"] = shapes["embed.tok_w"]
    check_shapes(shapes, cfg, str(gguf.path))
    return LazyWeights(parts, {n: shapes[n] for n in weight_shapes(cfg)}, dtype=dtype, device=device,
                       aliases=aliases)


def _read_part(buf: mmap.mmap, info: TensorInfo, cfg: ModelConfig, dtype: torch.dtype, path: Path) -> torch.Tensor:
    w = dequantize_tensor(buf, info, path)
    if info.name.endswith(("attn_q.weight", "attn_k.weight")):
        w = _unpermute_rope(w, cfg.num_heads if "attn_q" in info.name else cfg.num_kv_heads)
    return torch.from_numpy(w).to(dtype)


def _int8_linear(name: str) -> bool:
    """Whether canonical weight `name` is one of the layer linears `model.weight_bits: 8` holds in int8
    (all but the head: `runner.engines.lm.LM._quantize`)."""
    return name.startswith("layers.") and name.rsplit(".", 1)[1] in LINEAR_WEIGHTS


def _read_q8_0(buf: mmap.mmap, info: TensorInfo, cfg: ModelConfig, dtype: torch.dtype, path: Path) -> Int8Weight:
    """A Q8_0 matrix as stored: blocks of an fp16 scale and 32 int8 values along each row, read into int8
    values (rows, cols) and fp32 scales (rows, cols / 32), widened exactly; `dtype` is not used."""
    rows, cols = info.shape
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    if cols % block:
        raise ValueError(f"{path}: tensor {info.name} row length {cols} is not a multiple of the Q8_0 block {block}")
    raw = np.frombuffer(buf, dtype=np.uint8, count=rows * cols // block * block_bytes,
                        offset=info.offset).reshape(rows, cols // block, block_bytes)
    scale = np.ascontiguousarray(raw[..., :2]).view(np.float16).astype(np.float32).reshape(rows, cols // block)
    q = np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(rows, cols)
    if info.name.endswith(("attn_q.weight", "attn_k.weight")):  # the rows' permutation, scales alike
        heads = cfg.num_heads if "attn_q" in info.name else cfg.num_kv_heads
        q, scale = (np.ascontiguousarray(_unpermute_rope(a, heads)) for a in (q, scale))
    return Int8Weight(torch.from_numpy(q), torch.from_numpy(scale))


def check_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """Every canonical weight of `cfg` is present with its exact shape (given by name, before or
    without reading the tensors), and nothing else is."""
    expected = weight_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing weights {', '.join(missing[:3])}{more}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{source}: unexpected weights {', '.join(extra[:3])} for model {cfg.name}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{source}: weight {name} has shape {tuple(shapes[name])}, expected {shape}")
