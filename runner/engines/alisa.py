"""Our engine: the units of `runner.model.layers` on one device with a preallocated KV cache."""
from __future__ import annotations

import torch

from runner.kv.spec import KVSettings
from runner.engines.base import BatchOutput, TextDecoder, generate_batch
from runner.engines.lm import LM, Pack
from runner.model import kernels
from runner.engines.sampling import SamplingParams
from runner.model.weights import LoadedModel


def weight_pack(device: torch.device, dtype: torch.dtype, decode_rows: int) -> Pack:
    """How the engine holds its linear weights: plain where the native few-row kernel reads them faster
    than oneDNN reads packed ones (`kernels.plain_pays`), else packed."""
    return Pack.NONE if device.type == "cpu" and kernels.plain_pays(dtype, decode_rows) else Pack.UNSHARED


class AlisaEngine:
    name = "alisa"

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 kv: KVSettings | None = None, weight_bits: int | None = None, decode_rows: int = 1):
        """`decode_rows`: the rows of a decode step (the batch size), which decide whether the linear
        weights are packed for oneDNN or kept plain for the native few-row kernel (`kernels.plain_pays`)."""
        # The LM packs the linear weights (kernels.pack) and takes them out of `loaded`, so the plain
        # copies are freed as it goes.
        pack = weight_pack(device, dtype, decode_rows)
        self.lm = LM(loaded.config, loaded.weights, device, dtype, pack=pack, release=True, weight_bits=weight_bits)
        self.kv = kv
        self.tokenizer: TextDecoder = loaded.tokenizer

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None) -> BatchOutput:
        return generate_batch(self.lm, prompts, params, self.tokenizer, generator, self.kv)

    def reset_stats(self) -> None:
        """Nothing to reset: every figure of this engine comes with its BatchOutput."""

    def stats(self) -> dict[str, int | float]:
        return {}

    def close(self) -> None:
        """Nothing to release: the weights and KV are plain tensors."""
