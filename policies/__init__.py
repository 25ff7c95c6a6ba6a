"""KV-cache policies, registered by name (`kv.policy` in a job)."""
from policies.base import KVPolicy, get_policy, policy_names, register
from policies import dense  # noqa: F401  (registers itself)

__all__ = ["KVPolicy", "get_policy", "policy_names", "register"]
