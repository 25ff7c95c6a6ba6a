"""`runner.model.lazy`: weights read one tensor per lookup, equal to the eager load, and a load into the
block executor's tiers whose peak memory is one layer, not the model."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from runner.model.lazy import LazyWeights, SafetensorsFile
from runner.model.weights import ModelSourceError, load_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
KINDS = ["opt_preln", "opt_postln_proj", "llama_mha", "llama_gqa_tied", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_checkpoint_equals_eager(kind, dtype, hf_checkpoints):
    """safetensors (single and sharded, read by our header parser) and .bin shards, lazily, give the
    eager load's tensors bit for bit, in any order of lookup."""
    path = str(hf_checkpoints[kind])
    eager = load_model(name=None, path=path, dtype=dtype).weights
    lazy = load_model(name=None, path=path, dtype=dtype, lazy=True).weights
    assert isinstance(lazy, LazyWeights) and list(lazy) == list(eager)
    for name in reversed(list(eager)):
        assert name in lazy and lazy.shape(name) == tuple(eager[name].shape)
        got = lazy[name]
        assert got.dtype == dtype and torch.equal(got, eager[name]), name
    assert "layers.99.attn.qkv_w" not in lazy
    assert lazy.nbytes() == sum(t.nbytes for t in {id(t): t for t in eager.values()}.values())


def test_dummy_bytes_do_not_depend_on_what_else_is_read():
    """Each dummy tensor has its own seed: reading one alone, or after others, gives the same bytes."""
    a = load_model(name="opt-125m", path="dummy", dtype=torch.bfloat16, seed=5, lazy=True).weights
    b = load_model(name="opt-125m", path="dummy", dtype=torch.bfloat16, seed=5, lazy=True).weights
    eager = load_model(name="opt-125m", path="dummy", dtype=torch.bfloat16, seed=5).weights
    last = "layers.11.mlp.fc2_w"
    assert torch.equal(a[last], eager[last])  # read first here, last in the eager load
    for name in ("layers.3.attn.qkv_w", "embed.tok_w", "head.lm_w"):
        assert torch.equal(b[name], eager[name]) and torch.equal(a[name], b[name]), name
    assert torch.equal(a["head.lm_w"], a["embed.tok_w"])  # tied: one source tensor


def _write_safetensors(path, header: dict, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def test_safetensors_reader_against_the_library(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.randn(2, 2).half(), "e": torch.empty(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for key, t in tensors.items():
        got = f.read(key)
        assert got.dtype == t.dtype and torch.equal(got, t), key


@pytest.mark.parametrize("header, payload, match", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(16), "bad dtype, shape or offsets"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "bad dtype, shape or offsets"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "bad dtype, shape or offsets"),
])
def test_safetensors_reader_refuses_bad_headers(tmp_path, header, payload, match):
    _write_safetensors(tmp_path / "x.safetensors", header, payload)
    with pytest.raises(ValueError, match=match):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_truncated_checkpoint_is_a_model_error(hf_checkpoints, tmp_path):
    import shutil
    folder = tmp_path / "cut"
    shutil.copytree(hf_checkpoints["opt_preln"], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match=r"model\.path: .*model\.safetensors: tensor"):
        load_model(name=None, path=str(folder), dtype=torch.float32, lazy=True)


_LOAD_INTO_DISK = textwrap.dedent("""
    import sys, torch
    from runner.data.outputs import peak_rss_bytes
    from runner.model.weights import load_model
    from runner.memory.tiers import TierBudgets
    from runner.offload.executor import Executor, OffloadPolicy
    lazy = sys.argv[1] == "lazy"
    loaded = load_model(name="opt-1.3b", path="dummy", dtype=torch.bfloat16, seed=0, lazy=lazy)
    before = peak_rss_bytes()
    ex = Executor(loaded.config, loaded.weights, loaded.tokenizer, dtype=torch.bfloat16,
                  policy=OffloadPolicy(w_gpu_percent=0, w_cpu_percent=0),
                  budgets=TierBudgets(offload_dir=sys.argv[2], disk_page_cache=False))
    after = peak_rss_bytes()
    print(before, after, sum(l.staging_numel for l in ex.layers[:1]))
    ex.close()
""")


def test_streaming_load_peak_is_one_layer_not_the_model(tmp_path):
    """OPT-1.3B dummy in bf16 (2.6 GB) placed wholly on disk: with lazy weights the load's peak RSS
    grows by about one layer's tensors (generated, then written with pwrite), not by the model; the
    eager load holds all 2.6 GB. Real processes, real files."""
    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _LOAD_INTO_DISK, mode, str(tmp_path / mode)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600, check=True)
        before, after, _ = map(int, out.stdout.split())
        return before, after
    model_bytes = 2 * 1_315_758_080  # opt-1.3b parameters (matrices and vectors) x 2 bytes
    layer_bytes = 2 * 12 * 2048 ** 2  # one OPT-1.3B decoder layer's matrices in bf16: ~100 MB
    eager_before, _ = run("eager")
    lazy_before, lazy_after = run("lazy")
    assert eager_before - lazy_before > 0.9 * model_bytes  # the eager load holds the model, the lazy one not
    embed_bytes = 2 * 50272 * 2048  # the largest single tensor (embedding), read once: ~206 MB
    assert lazy_after - lazy_before < embed_bytes + 4 * layer_bytes + 256 * 2 ** 20, (lazy_before, lazy_after)


@pytest.mark.parametrize("kind", ["opt_preln", "llama_mha"])  # a single safetensors file; sharded with an index
def test_a_checkpoint_streams_into_its_tiers_and_generates_as_the_plain_engine(kind, hf_checkpoints, tmp_path,
                                                                               compute_device):
    """Weights read lazily from a safetensors checkpoint straight into the gpu, cpu and disk tiers of the
    executor on the compute device (CUDA in tests/gpu/check.sh): same greedy tokens as the plain engine
    fed the eager load, logits within fp32 rounding."""
    from runner.engines.lm import LM, Batch
    from runner.engines.sampling import SamplingParams
    from runner.memory.tiers import TierBudgets
    from runner.model.tokenizer import ByteTokenizer
    from runner.offload.executor import Executor, OffloadPolicy
    path, device, steps = str(hf_checkpoints[kind]), compute_device, 4
    eager = load_model(name=None, path=path, dtype=torch.float32, device=device)
    lazy = load_model(name=None, path=path, dtype=torch.float32, device=device, lazy=True)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]]
    batch = Batch(LM(eager.config, eager.weights, device, torch.float32), prompts, steps)
    ref = [batch.prefill()]
    for _ in range(steps - 1):
        ref.append(batch.decode(ref[-1].argmax(-1)))
    got = []
    with Executor(lazy.config, lazy.weights, ByteTokenizer(), device=device, gpu_batch_size=2,
                  policy=OffloadPolicy(w_gpu_percent=40, w_cpu_percent=30),
                  budgets=TierBudgets(offload_dir=str(tmp_path))) as ex:
        out = ex.generate(prompts, SamplingParams(max_new_tokens=steps, ignore_eos=True),
                          observe=lambda i, lg: got.append(lg.cpu().clone()))
        assert ex.stats()["bytes_disk_read"] > 0 and ex.stats()["bytes_gpu_from_cpu"] > 0
    assert [s.token_ids for s in out.sequences] == torch.stack([r.argmax(-1) for r in ref], 1).tolist()
    for a, b in zip(ref, got):
        assert (a.cpu() - b).abs().max().item() < 1e-4
