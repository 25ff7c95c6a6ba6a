"""KV-cache policies, registered by name (`kv.policy` in a job)."""
from policies.base import KVPolicy, ScoreMode, Scoring, Selection, get_policy, policy_names, register
from policies import dense, h2o, local, streaming, strided, swa  # noqa: F401  (each registers itself)

__all__ = ["KVPolicy", "ScoreMode", "Scoring", "Selection", "get_policy", "policy_names", "register"]
