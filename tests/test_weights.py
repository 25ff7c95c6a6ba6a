"""`load_model`: HF checkpoint directories, dummy weights and the user-facing errors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import build_hf_model
from hf_reference import hf_canonical_reference
from runner.model.config import LLAMA_ARCH, OPT_ARCH, QWEN2_ARCH, get_preset
from runner.model.layers import weight_shapes
from runner.model.tokenizer import ByteTokenizer
from runner.model.weights import ModelSourceError, hf_config, load_model


KINDS = ["opt_preln", "opt_postln_proj", "llama_mha", "llama_gqa_tied", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_checkpoint_matches_state_dict(kind, hf_checkpoints, hf_models):
    loaded = load_model(name=None, path=str(hf_checkpoints[kind]), dtype=torch.float32)
    cfg, w = loaded.config, loaded.weights
    assert loaded.source == f"hf:{hf_checkpoints[kind]}"
    assert {k: tuple(v.shape) for k, v in w.items()} == weight_shapes(cfg)
    # Against the model transformers loads back, and against the model as it was built before saving
    # (so a tensor transformers silently re-initialised on load would also be caught).
    for model in (hf_models(kind), build_hf_model(kind)):
        ref = hf_canonical_reference(model.state_dict(), model.config.model_type, cfg.num_layers)
        assert set(ref) == set(w)
        for name, t in ref.items():
            assert w[name].dtype == torch.float32
            assert torch.equal(w[name], t), name
    assert (w["head.lm_w"] is w["embed.tok_w"]) == cfg.tie_embeddings


@pytest.mark.parametrize("kind", KINDS)
def test_hf_config_fields(kind, hf_checkpoints, hf_models):
    cfg = load_model(name="display", path=str(hf_checkpoints[kind]), dtype=torch.float32).config
    hc = hf_models(kind).config
    assert cfg.name == "display"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (
        hc.vocab_size, hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads)
    assert cfg.tie_embeddings == bool(hc.tie_word_embeddings)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (hc.bos_token_id, hc.eos_token_id)
    if hc.model_type != "opt":
        assert cfg.arch == {"llama": LLAMA_ARCH, "qwen2": QWEN2_ARCH}[hc.model_type]
        assert cfg.num_kv_heads == hc.num_key_value_heads
        assert cfg.intermediate_size == hc.intermediate_size
        assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
        assert cfg.norm_eps == hc.rms_norm_eps
        assert cfg.max_seq_len == hc.max_position_embeddings
    else:
        assert cfg.intermediate_size == hc.ffn_dim
        assert cfg.arch == dataclasses.replace(OPT_ARCH, norm_before=hc.do_layer_norm_before)
        assert cfg.word_embed_proj_dim == (None if hc.word_embed_proj_dim == hc.hidden_size else hc.word_embed_proj_dim)


def test_expected_special_cases(hf_checkpoints):
    theta = {k: load_model(name=None, path=str(hf_checkpoints[k]), dtype=torch.float32).config.rope_theta
             for k in ("llama_mha", "llama_gqa_tied")}
    assert theta == {"llama_mha": 10000.0, "llama_gqa_tied": 500000.0}
    post = load_model(name=None, path=str(hf_checkpoints["opt_postln_proj"]), dtype=torch.float32)
    assert post.config.word_embed_proj_dim == 32 and not post.config.arch.norm_before
    assert "head.ln_w" not in post.weights and "embed.proj_in_w" in post.weights
    assert isinstance(post.tokenizer, ByteTokenizer)  # no tokenizer files in the checkpoint


def test_hf_dtype_cast_keeps_tie(hf_checkpoints):
    loaded = load_model(name=None, path=str(hf_checkpoints["llama_gqa_tied"]), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())
    assert loaded.weights["head.lm_w"] is loaded.weights["embed.tok_w"]


def test_hf_eos_list_and_rope_scaling(hf_checkpoints, tmp_path):
    hf = json.loads((hf_checkpoints["llama_mha"] / "config.json").read_text())
    cfg, eos = hf_config({**hf, "eos_token_id": [7, 9]}, name="x", source="config.json")
    assert cfg.eos_token_id == 7 and eos == [7, 9]
    with pytest.raises(ModelSourceError, match="rope scaling"):
        hf_config({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}}, name="x", source="config.json")
    with pytest.raises(ModelSourceError, match="model_type 'gpt2'"):
        hf_config({**hf, "model_type": "gpt2"}, name="x", source="config.json")
    with pytest.raises(ModelSourceError, match="head_dim"):
        hf_config({**hf, "head_dim": 32}, name="x", source="config.json")


# Qwen/Qwen2.5-0.5B's config.json (the keys the loader reads), as published.
QWEN25_05B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
              "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
              "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643}


def test_qwen2_preset_is_what_the_loader_makes_of_its_config():
    cfg, eos = hf_config(QWEN25_05B, name="qwen2.5-0.5b", source="config.json")
    assert cfg == get_preset("qwen2.5-0.5b") and eos == [151643]
    assert cfg.arch == QWEN2_ARCH and cfg.arch.qkv_bias and not cfg.arch.out_bias
    shapes = weight_shapes(cfg)
    assert shapes["layers.0.attn.qkv_b"] == (896 + 2 * 128,) and "layers.0.attn.o_b" not in shapes
    with pytest.raises(ModelSourceError, match="use_sliding_window"):
        hf_config({**QWEN25_05B, "use_sliding_window": True}, name="x", source="config.json")


def test_weight_shapes_follow_the_arch():
    """Each unit's weights come from `Arch`, in the order the offload split reads them (biases last)."""
    opt, llama, qwen2 = (get_preset(n) for n in ("opt-125m", "llama-7b", "qwen2.5-0.5b"))

    def leaves(cfg, prefix):
        return [k.removeprefix(prefix) for k in weight_shapes(cfg) if k.startswith(prefix)]

    assert leaves(opt, "embed.") == ["tok_w", "pos_w"] and leaves(llama, "embed.") == ["tok_w"]
    assert leaves(opt, "layers.0.attn.") == ["ln_w", "qkv_w", "o_w", "ln_b", "qkv_b", "o_b"]
    assert leaves(llama, "layers.0.attn.") == ["ln_w", "qkv_w", "o_w"]
    assert leaves(qwen2, "layers.0.attn.") == ["ln_w", "qkv_w", "o_w", "qkv_b"]
    assert leaves(opt, "layers.0.mlp.") == ["ln_w", "ln_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"]
    assert leaves(qwen2, "layers.0.mlp.") == ["ln_w", "gate_up_w", "down_w"]
    assert leaves(opt, "head.") == ["lm_w", "ln_w", "ln_b"] and leaves(llama, "head.") == ["lm_w", "ln_w"]
    assert leaves(get_preset("opt-350m"), "head.") == ["lm_w", "proj_out_w"]  # post-LN: no final norm


def test_hf_missing_tensor_is_named(hf_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(hf_checkpoints["llama_gqa_tied"], folder)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.gate_up_w"):
        load_model(name=None, path=str(folder), dtype=torch.float32)


DUMMY_PRESETS = ["opt-125m", "opt-350m", "smollm2-135m"]


@pytest.mark.parametrize("name", DUMMY_PRESETS)
def test_dummy_weights(name):
    a = load_model(name=name, path="dummy", dtype=torch.float32, seed=0)
    assert a.source == "dummy" and isinstance(a.tokenizer, ByteTokenizer)
    assert {k: tuple(v.shape) for k, v in a.weights.items()} == weight_shapes(get_preset(name))
    for k, t in a.weights.items():
        sample = t.flatten()[:65536]  # a slice keeps opt-350m's 331M values cheap to check
        assert t.dtype == torch.float32 and torch.isfinite(sample).all(), k
        if k.endswith("ln_w"):
            assert torch.equal(t, torch.ones_like(t)), k
        elif k.endswith("_b"):
            assert torch.equal(t, torch.zeros_like(t)), k
        else:
            assert 0.015 < sample.std().item() < 0.025 and abs(sample.mean().item()) < 0.002, k  # N(0, 0.02)
    assert a.weights["head.lm_w"] is a.weights["embed.tok_w"]


# opt-350m takes ~4 s per load, so it is only checked above
@pytest.mark.parametrize("name", ["opt-125m", "smollm2-135m"])
def test_dummy_seeding(name):
    a, b, c = (load_model(name=name, path="dummy", dtype=torch.float32, seed=s) for s in (0, 0, 1))
    for k in ("layers.0.attn.qkv_w", "embed.tok_w", f"layers.{a.config.num_layers - 1}.attn.o_w"):
        assert torch.equal(a.weights[k], b.weights[k]), k
        assert not torch.equal(a.weights[k], c.weights[k]), k
    # Different tensors get different draws, not one repeated block.
    assert not torch.equal(a.weights["layers.0.attn.o_w"], a.weights["layers.1.attn.o_w"])


def test_dummy_in_bfloat16_and_token_ids():
    m = load_model(name="smollm2-135m", path="dummy", dtype=torch.bfloat16, seed=3)
    assert all(t.dtype == torch.bfloat16 for t in m.weights.values())
    tok = m.tokenizer
    assert (m.config.bos_token_id, m.config.eos_token_id, m.config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_error_nonexistent_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelSourceError, match=f"{missing} does not exist"):
        load_model(name="opt-125m", path=str(missing), dtype=torch.float32)


def test_error_dir_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match=rf"{tmp_path}: no config.json \(expected a Hugging Face checkpoint"):
        load_model(name="opt-30b", path=str(tmp_path), dtype=torch.float32)


def test_error_dir_without_weights(hf_checkpoints, tmp_path):
    shutil.copy(hf_checkpoints["opt_preln"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelSourceError, match="no model.safetensors or pytorch_model.bin"):
        load_model(name=None, path=str(tmp_path), dtype=torch.float32)


def test_error_auto_needs_smollm2():
    with pytest.raises(ModelSourceError, match="auto is only available for smollm2-135m.*a .gguf file or dummy"):
        load_model(name="opt-125m", path="auto", dtype=torch.float32)
    with pytest.raises(ModelSourceError, match="auto"):
        load_model(name=None, path="auto", dtype=torch.float32)


def test_error_other_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelSourceError, match="neither a checkpoint directory nor a .gguf file"):
        load_model(name=None, path=str(f), dtype=torch.float32)


def test_error_dummy_too_big():
    # opt-175b in float32 is ~650 GiB; this machine has 24 GiB.
    with pytest.raises(ModelSourceError) as err:
        load_model(name="opt-175b", path="dummy", dtype=torch.float32)
    msg = str(err.value)
    assert "opt-175b" in msg and "698,417,872,896 bytes" in msg and "available" in msg and "\n" not in msg


def test_auto_loads_smollm2(smollm2_gguf_path):
    m = load_model(name="smollm2-135m", path="auto", dtype=torch.float32)
    assert m.source == f"gguf:{smollm2_gguf_path}"
    assert m.config.name == "smollm2-135m" and m.config.num_layers == 30
    assert m.weights["head.lm_w"] is m.weights["embed.tok_w"]
    # The file's architecture is the smollm2-135m preset's (apart from the display name and pad id).
    preset = get_preset("smollm2-135m")
    assert m.config.replace(pad_token_id=None, norm_eps=preset.norm_eps) == preset
    assert abs(m.config.norm_eps - preset.norm_eps) < 1e-9
