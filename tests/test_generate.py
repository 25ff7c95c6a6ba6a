"""Generation on the real SmolLM2-135M GGUF against HF transformers loading the same file."""
from __future__ import annotations

import pytest
import torch

from runner.engines.base import generate_batch
from runner.engines.lm import LM, Batch
from runner.data.outputs import FinishReason
from runner.engines.sampling import SamplingParams
from runner.model.weights import load_model

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["What is the capital of France?",
             "Name three colours of the rainbow and explain briefly why the sky is blue.",
             "Write one sentence about a cat."]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    loaded = load_model(name="smollm2-135m", path="auto", dtype=torch.float32, device="cpu")
    return LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32), loaded.tokenizer


def _prompts(tok) -> list[list[int]]:
    return [tok.encode(CHAT.format(q)) for q in QUESTIONS]


def test_logits_match_transformers_gguf(smollm2, hf_smollm2):
    lm, tok = smollm2
    hf, _ = hf_smollm2
    ids = _prompts(tok)[1]
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
        batch = Batch(lm, [ids[:-3]], max_new_tokens=3)
        ours = [batch.prefill()[0]] + [batch.decode(torch.tensor([t]))[0] for t in ids[-3:]]
    for i, logits in enumerate(ours):
        ref_row = ref[len(ids) - 4 + i]
        torch.testing.assert_close(logits, ref_row, rtol=1e-4, atol=1e-4 * ref_row.abs().max().item())


def test_greedy_batch_token_identical_to_transformers_generate(smollm2, hf_smollm2):
    lm, tok = smollm2
    hf, _ = hf_smollm2
    prompts = _prompts(tok)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=2)[:, width:].tolist()
    out = generate_batch(lm, prompts, SamplingParams(max_new_tokens=24), tok)
    for row, seq in zip(ref, out.sequences):
        expected = row[:row.index(2)] if 2 in row else row
        assert seq.token_ids == expected
    assert "Paris" in out.sequences[0].text


def test_finish_reasons_eos_stop_and_length(smollm2):
    lm, tok = smollm2
    prompts = _prompts(tok)
    eos = generate_batch(lm, prompts[:1], SamplingParams(max_new_tokens=40), tok).sequences[0]
    assert eos.finish_reason is FinishReason.EOS and "Paris" in eos.text
    length = generate_batch(lm, prompts[:1], SamplingParams(max_new_tokens=3), tok).sequences[0]
    assert length.finish_reason is FinishReason.LENGTH and len(length.token_ids) == 3
    stop = generate_batch(lm, prompts[:1], SamplingParams(max_new_tokens=40, stop=("France",)), tok).sequences[0]
    assert stop.finish_reason is FinishReason.STOP
    assert "France" not in stop.text and eos.text.startswith(stop.text)
    forced = generate_batch(lm, prompts[:1], SamplingParams(max_new_tokens=30, ignore_eos=True), tok)
    assert forced.generated_tokens == 30 and forced.sequences[0].finish_reason is FinishReason.LENGTH


def test_sampling_is_seeded(smollm2):
    lm, tok = smollm2
    prompts = _prompts(tok)[2:]
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.2, top_k=50, top_p=0.95,
                            ignore_eos=True)

    def run(seed):
        return generate_batch(lm, prompts, params, tok, torch.Generator().manual_seed(seed)).sequences[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_dummy_weights_give_finite_varied_logits():
    for name in ("opt-125m", "smollm2-135m"):
        loaded = load_model(name=name, path="dummy", dtype=torch.float32, device="cpu", seed=3)
        lm = LM(loaded.config, loaded.weights, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            logits = Batch(lm, [[5, 6, 7, 8], [9, 10, 11, 12]], 1).prefill()
        assert torch.isfinite(logits).all()
        assert logits.std() > 1e-3
        assert not torch.equal(logits[0], logits[1])
