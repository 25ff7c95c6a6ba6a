"""`read_gguf` on the real SmolLM2 GGUF against transformers' loading of the same file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runner.model.config import LLAMA_ARCH
from runner.model.gguf import _unpermute_rope, read_gguf
from runner.model.layers import weight_shapes

from hf_reference import hf_llama_reference


def test_smollm2_config(smollm2_loaded):
    cfg, weights, tok = smollm2_loaded
    assert cfg.arch == LLAMA_ARCH
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.max_seq_len == 8192
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings
    assert abs(cfg.norm_eps - 1e-5) < 1e-10
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.name  # general.name from the file


def test_smollm2_config_matches_transformers(smollm2_loaded, hf_smollm2):
    cfg, hc = smollm2_loaded[0], hf_smollm2[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (
        hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size, hc.num_attention_heads, hc.num_key_value_heads)
    assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
    assert cfg.norm_eps == pytest.approx(hc.rms_norm_eps, rel=1e-6)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (
        hc.vocab_size, hc.max_position_embeddings, hc.tie_word_embeddings)


def test_smollm2_weights_equal_transformers(smollm2_loaded, hf_smollm2):
    cfg, weights, _ = smollm2_loaded
    assert {k: tuple(v.shape) for k, v in weights.items()} == weight_shapes(cfg)
    assert weights["head.lm_w"] is weights["embed.tok_w"]
    ref = hf_llama_reference(hf_smollm2[0].state_dict(), cfg.num_layers)
    assert set(ref) | {"head.lm_w"} == set(weights)
    for name, t in ref.items():
        assert weights[name].dtype == torch.float32
        diff = (weights[name] - t).abs().max().item()
        assert diff == 0.0, f"{name}: max abs diff {diff}"


def test_unpermute_is_needed_and_inverts_llama_cpp():
    # llama.cpp's convert script permutes with reshape(n_head, 2, hd/2, in).swapaxes(1, 2).
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(_unpermute_rope(permuted, 3), w)


def test_read_gguf_dtype_keeps_tie(tiny_llama_ggufs):
    cfg, weights, _ = read_gguf(tiny_llama_ggufs["gqa_tied_q8"], dtype=torch.bfloat16)
    assert cfg.tie_embeddings
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert weights["head.lm_w"] is weights["embed.tok_w"]
    ref = read_gguf(tiny_llama_ggufs["gqa_tied_q8"])[1]
    assert torch.equal(weights["layers.0.attn.qkv_w"], ref["layers.0.attn.qkv_w"].bfloat16())


def test_rejects_non_gguf_and_missing_arch(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(bad)


@pytest.mark.parametrize("name", ["mha_mixed", "gqa_tied_q8"])
def test_tiny_gguf_weights_equal_transformers(name, tiny_llama_ggufs, hf_tiny_gguf):
    """Non-square GQA q/k, untied output and F16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors, same file for both loaders."""
    cfg, weights, _ = read_gguf(tiny_llama_ggufs[name])
    model = hf_tiny_gguf(name)[0]
    assert {k: tuple(v.shape) for k, v in weights.items()} == weight_shapes(cfg)
    assert (weights["head.lm_w"] is weights["embed.tok_w"]) == cfg.tie_embeddings
    sd = model.state_dict()
    ref = hf_llama_reference(sd, cfg.num_layers)
    ref["head.lm_w"] = sd["lm_head.weight"]
    for key, t in ref.items():
        assert torch.equal(weights[key], t), key
    hc = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (
        hc.num_attention_heads, hc.num_key_value_heads, hc.rope_parameters["rope_theta"])


def test_tiny_gguf_matches_source_checkpoint(tiny_llama_ggufs, hf_models):
    """Independent of transformers' GGUF path: F32 q/k come back exactly as the original checkpoint's
    rows (so the un-permutation is right), quantized tensors within their quantization error."""
    from conftest import TINY_GGUF_SPECS

    cfg, weights, _ = read_gguf(tiny_llama_ggufs["mha_mixed"])
    sd = hf_models(TINY_GGUF_SPECS["mha_mixed"][0]).state_dict()
    q, k, v = weights["layers.1.attn.qkv_w"].split([cfg.hidden_size, cfg.kv_dim, cfg.kv_dim])
    assert torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, sd["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(weights["embed.tok_w"], sd["model.embed_tokens.weight"].half().float())
    for ours, theirs in [(v, "self_attn.v_proj"), (weights["layers.1.attn.o_w"], "self_attn.o_proj"),
                         (weights["layers.1.mlp.down_w"], "mlp.down_proj")]:
        src = sd[f"model.layers.1.{theirs}.weight"]
        # 4/5-bit blocks: error up to ~1/8 of a block's range; a wrong row order would be ~100%.
        assert (ours - src).abs().max() < 0.2 * src.abs().max(), theirs
        assert (ours - src).norm() < 0.2 * src.norm(), theirs
        assert not torch.equal(ours, src)  # really went through a quantized type


def test_rejects_other_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'; only 'llama'"):
        read_gguf(path)
