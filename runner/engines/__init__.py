"""Generation engines behind one interface: ours (`alisa`) and the HF transformers baseline (`hf`)."""
from __future__ import annotations

from typing import Protocol

import torch

from runner.generate import BatchOutput
from runner.sampling import SamplingParams


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None) -> BatchOutput: ...
