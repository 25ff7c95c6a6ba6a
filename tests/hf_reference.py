"""Canonical weight names written out by hand from HF state dicts: the loaders' test oracle,
independent of runner.model.weights and runner.model.gguf."""
from __future__ import annotations

import torch


def hf_llama_reference(sd: dict[str, torch.Tensor], num_layers: int, qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    """Canonical weights written out by hand from a transformers LLaMA state dict (`qkv_bias`: Qwen2's)."""
    ref = {"embed.tok_w": sd["model.embed_tokens.weight"], "head.ln_w": sd["model.norm.weight"]}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        ref[f"layers.{i}.attn.ln_w"] = sd[p + "input_layernorm.weight"]
        ref[f"layers.{i}.attn.qkv_w"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if qkv_bias:
            ref[f"layers.{i}.attn.qkv_b"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        ref[f"layers.{i}.attn.o_w"] = sd[p + "self_attn.o_proj.weight"]
        ref[f"layers.{i}.mlp.ln_w"] = sd[p + "post_attention_layernorm.weight"]
        ref[f"layers.{i}.mlp.gate_up_w"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        ref[f"layers.{i}.mlp.down_w"] = sd[p + "mlp.down_proj.weight"]
    return ref


def hf_canonical_reference(sd: dict[str, torch.Tensor], model_type: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Canonical weights written out by hand from an HF state dict (independent of runner.model.weights)."""
    if model_type in ("llama", "qwen2"):
        return {**hf_llama_reference(sd, num_layers, qkv_bias=model_type == "qwen2"), "head.lm_w": sd["lm_head.weight"]}
    d = "model.decoder."
    ref = {"embed.tok_w": sd[d + "embed_tokens.weight"], "embed.pos_w": sd[d + "embed_positions.weight"],
           "head.lm_w": sd["lm_head.weight"]}
    for key, name in [("project_in.weight", "embed.proj_in_w"), ("project_out.weight", "head.proj_out_w"),
                      ("final_layer_norm.weight", "head.ln_w"), ("final_layer_norm.bias", "head.ln_b")]:
        if d + key in sd:
            ref[name] = sd[d + key]
    for i in range(num_layers):
        p = f"{d}layers.{i}."
        for w, b in [("weight", "w"), ("bias", "b")]:
            ref[f"layers.{i}.attn.ln_{b}"] = sd[p + f"self_attn_layer_norm.{w}"]
            ref[f"layers.{i}.attn.qkv_{b}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            ref[f"layers.{i}.attn.o_{b}"] = sd[p + f"self_attn.out_proj.{w}"]
            ref[f"layers.{i}.mlp.ln_{b}"] = sd[p + f"final_layer_norm.{w}"]
            ref[f"layers.{i}.mlp.fc1_{b}"] = sd[p + f"fc1.{w}"]
            ref[f"layers.{i}.mlp.fc2_{b}"] = sd[p + f"fc2.{w}"]
    return ref
