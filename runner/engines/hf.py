"""The baseline a user would otherwise pick: HF transformers `generate` on the same token ids.

transformers is imported here only; the runner's own forward pass never uses it. Stopping
uses our `StopTracker` inside a StoppingCriteria, so both engines stop by the same rules,
and the first criteria call marks the end of prefill (prompt forward + first token).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from runner.engines.base import BatchOutput, StopTracker, TextDecoder
from runner.engines.lm import left_pad
from runner.engines.sampling import SamplingParams


class HFEngine:
    name = "hf"

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, tokenizer: TextDecoder,
                 pad_token_id: int):
        from transformers import AutoModelForCausalLM  # baseline-only dependency

        p = Path(path)
        if p.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        elif p.is_dir():
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
        else:
            raise ValueError(f"model.path: engine hf needs a checkpoint directory or .gguf file, got {path!r}")
        self.model = model.to(device).eval()
        self.device, self.tokenizer, self.pad = device, tokenizer, pad_token_id

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None) -> BatchOutput:
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids, valid = left_pad(prompts, self.pad)
        tracker = StopTracker(len(prompts), params, self.tokenizer)
        marks: list[float] = []

        class Track(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
                if not marks:
                    marks.append(time.perf_counter())
                tracker.add(input_ids[:, -1].tolist())
                return torch.tensor(tracker.done, device=input_ids.device)

        if params.do_sample:
            torch.manual_seed(params.seed)
        sample_kw = dict(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                         top_p=params.top_p) if params.do_sample else dict(do_sample=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=valid.long().to(self.device),
                                max_new_tokens=params.max_new_tokens, pad_token_id=self.pad,
                                eos_token_id=None, stopping_criteria=StoppingCriteriaList([Track()]),
                                use_cache=True, **sample_kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        t1 = marks[0] if marks else t2
        return BatchOutput(sequences=tracker.outputs, prefill_s=t1 - t0, decode_s=t2 - t1,
                           prompt_tokens=sum(len(p) for p in prompts), generated_tokens=sum(tracker.steps))

    def reset_stats(self) -> None:
        """Nothing to reset: every figure of this engine comes with its BatchOutput."""

    def stats(self) -> dict[str, int | float]:
        return {}

    def close(self) -> None:
        """Nothing to release: transformers' model is a plain module."""
