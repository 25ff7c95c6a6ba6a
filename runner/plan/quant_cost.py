"""Compression's compute time in the cost model (`runner.plan.cost_model`): each quantize and dequantize
a plan's storage makes the compute device do, priced per element by the profile's `quant_ns`.

What each path converts (the executor's code; FlexGen's does the same per step):
- compress_weight: every compressed matrix is dequantized into the gpu staging slot when its layer
  runs, once per step for the whole block (runner/offload/scheduled.py::WeightRead);
- compress_cache (FlexGen's per-sequence split): each layer and GPU batch dequantizes the whole stored
  prefix of every row into the working slot, and quantizes the new tokens as they are stored (and
  dequantizes them back, so attention sees what will be read later: runner/offload/sequence_kv.py);
- kv.bits under token placement (ALISA): new tokens are quantized as they are stored, and the tokens
  fetched or re-read each step are dequantized (runner/offload/token_kv.py).
"""
from __future__ import annotations

import numpy as np

from runner.plan.hardware import HardwareProfile

NS = 1e-9


def weight_dequantize_s(hw: HardwareProfile, elements: int) -> float:
    """Seconds to dequantize `elements` 4-bit weight elements (compress_weight, FlexGen's 4 bits)."""
    return elements * hw.quant_ns.weight_dequantize_4 * NS


def kv_store_s(hw: HardwareProfile, bits: int, elements: np.ndarray | float, read_back: bool) -> np.ndarray | float:
    """Seconds to quantize `elements` new K/V elements at `bits` (and, with `read_back`, dequantize them
    again for the attention that runs over them now)."""
    quantize, dequantize = hw.quant_ns.kv(bits)
    return elements * (quantize + (dequantize if read_back else 0.0)) * NS


def kv_load_s(hw: HardwareProfile, bits: int, elements: np.ndarray | float) -> np.ndarray | float:
    """Seconds to dequantize `elements` stored K/V elements at `bits` for attention."""
    return elements * hw.quant_ns.kv(bits)[1] * NS
