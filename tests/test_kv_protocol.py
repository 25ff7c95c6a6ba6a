"""The declared interfaces: every KV cache implements `runner.kv.protocol.KVCacheBase` (and the
capabilities it claims), the KV store is what attention units need (`runner.model.attention_kv`),
and every engine is an `runner.engines.base.Engine`."""
from __future__ import annotations

import inspect

import pytest
import torch

from runner.engines.alisa import AlisaEngine
from runner.engines.base import Engine
from runner.engines.hf import HFEngine
from runner.kv.cache import KVCache
from runner.kv.protocol import KVCacheBase, KVTraffic
from runner.kv.quant import QuantizedKVCache
from runner.kv.spec import KVSettings
from runner.kv.store import KVStore
from runner.model.attention_kv import AttentionKV
from runner.model.config import LLAMA_ARCH, ModelConfig
from runner.offload.executor import Executor
from runner.offload.sequence_kv import SequenceSplitKV
from runner.offload.token_kv import TokenTieredKV

CFG = ModelConfig(name="tiny", arch=LLAMA_ARCH, vocab_size=100, hidden_size=64, intermediate_size=160,
                  num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64, norm_eps=1e-5,
                  tie_embeddings=False)
CACHES = [KVCache, QuantizedKVCache, SequenceSplitKV, TokenTieredKV]
ENGINES = [AlisaEngine, HFEngine, Executor]


def _members(protocol: type) -> list[str]:
    """The names a Protocol declares: its methods, properties and annotated attributes."""
    own = [n for n in vars(protocol) if not n.startswith("_")]
    return sorted(set(own) | set(getattr(protocol, "__annotations__", {})))


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _check_conforms(cls: type, protocol: type) -> None:
    """`cls` has every member of `protocol`; each method takes the protocol's parameters first, by name,
    and any more only with defaults."""
    for name in _members(protocol):
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        want = vars(protocol).get(name)
        if inspect.isfunction(want):
            got = inspect.signature(getattr(cls, name)).parameters
            assert list(got)[:len(_params(want))] == _params(want), f"{cls.__name__}.{name}"
            extra = list(got.values())[len(_params(want)):]
            assert all(p.default is not inspect.Parameter.empty for p in extra), f"{cls.__name__}.{name}"


@pytest.mark.parametrize("cls", CACHES, ids=lambda c: c.__name__)
def test_each_cache_implements_the_base(cls):
    assert issubclass(cls, KVCacheBase)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} unimplemented"
    for name, base in vars(KVCacheBase).items():  # an override keeps the declared parameters
        own = vars(cls).get(name)
        if inspect.isfunction(base) and inspect.isfunction(own):
            assert _params(own) == _params(base), f"{cls.__name__}.{name}"


# What each cache claims beyond storing slots: the flags it sets and the optional methods it overrides.
CLAIMS = {
    KVCache: ({"groupable"}, {"compact", "select_rows"}),
    QuantizedKVCache: ({"groupable"}, {"compact", "select_rows"}),
    SequenceSplitKV: (set(), {"compact", "prefetch", "flush", "attend", "free"}),
    TokenTieredKV: ({"wants_inputs", "fetches_ahead"}, {"observe_inputs", "fetch_ahead", "drop_ahead", "free"}),
}


@pytest.mark.parametrize("cls", CACHES, ids=lambda c: c.__name__)
def test_each_cache_implements_what_it_claims(cls):
    flags, methods = CLAIMS[cls]
    for flag in ("groupable", "wants_inputs", "fetches_ahead"):
        assert getattr(cls, flag) is (flag in flags), f"{cls.__name__}.{flag}"
    optional = {n for n, f in vars(KVCacheBase).items()
                if inspect.isfunction(f) and n not in KVCacheBase.__abstractmethods__}
    assert {n for n in optional if n in vars(cls)} == methods


def test_plain_caches_take_the_neutral_defaults():
    cache = KVCache(CFG, 2, 8, torch.float32, "cpu")
    assert cache.traffic is None and not cache.cpu_compute and not cache.wants_inputs
    cache.prefetch(0, 4)  # a cache on one device has nothing to move: these return without effect
    cache.flush(0, 3, 4)
    cache.drop_ahead(0)
    cache.free()
    with pytest.raises(NotImplementedError, match="cpu_compute"):
        cache.attend(0, torch.zeros(2, 4, 1, 16), 4, None)


def test_traffic_adds_field_by_field():
    a = KVTraffic(up_bytes=1, ahead_bytes=2, down_bytes=3, recomputed=4, recompute_s=0.5, recompute_saved_bytes=6)
    b = KVTraffic(up_bytes=10, ahead_bytes=20, down_bytes=30, recomputed=40, recompute_s=0.25, recompute_saved_bytes=60)
    total = a + b
    assert total == KVTraffic(up_bytes=11, ahead_bytes=22, down_bytes=33, recomputed=44, recompute_s=0.75,
                              recompute_saved_bytes=66)
    assert total is not a and a.up_bytes == 1  # a new record: neither operand changes


def test_kv_store_is_what_attention_needs():
    _check_conforms(KVStore, AttentionKV)
    store = KVStore(CFG, KVSettings(), torch.ones(2, 8, dtype=torch.bool), torch.float32, torch.device("cpu"))
    assert isinstance(store, AttentionKV)
    assert not store.wants_inputs


def test_model_layer_imports_no_higher_layer():
    import pathlib
    import re
    model = pathlib.Path(__file__).resolve().parents[1] / "runner" / "model"
    higher = re.compile(r"^\s*(from|import)\s+(runner\.(kv|engines|offload|plan|data|eval)\b|runner\.(job|"
                        r"hardware_spec|cluster_spec|run_job|run_eval|run_loop|resume|planner|cluster)\b|policies\b)",
                        re.M)
    for path in model.glob("*.py"):
        assert not higher.search(path.read_text()), path.name


@pytest.mark.parametrize("cls", ENGINES, ids=lambda c: c.__name__)
def test_each_engine_is_an_engine(cls):
    _check_conforms(cls, Engine)
    assert isinstance(cls.name, str)
