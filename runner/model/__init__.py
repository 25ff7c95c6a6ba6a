"""The model, without devices or placement: what a decoder computes and how its weights are read.

`config` (ModelConfig, presets; families differ by an `Arch` value, not by branches), `ops` (the math:
pure functions over tensors), `layers` (embedding, attention, MLP and head as schedulable units;
`weight_shapes` is the canonical weight layout every loader produces), `attention_kv` (the interface an
attention unit needs from its KV), `kernels` + `native` + `csrc/` (oneDNN linears, the C decode attention
and RMSNorm, built on first use), `greedy_head` (exact argmax through a bf16 screen), `weights` + `lazy` +
`gguf` + `tokenizer` (checkpoints, read whole or one tensor per lookup, and tokenizers).

May import: `runner.spec`, `runner.units`. Nothing from kv/, engines/, offload/, plan/, data/, eval/.
"""
