"""One batch's KV cache under a sparse policy: `spec` (the job's `kv` section and `KVSettings`), `store`
(`KVStore`: storage, the policy's selection, retain / evict), `protocol` (`KVCacheBase`, the interface
every cache implements, and `KVTraffic`), `cache` (the dense cache), `quant` (INT8 / INT4 storage and
its one layout), `scores` (the attention scores policies select by), `picks` (pick buffers).

May import: `runner.spec`, `runner.units`, `runner.model`, `policies`.
"""
