"""alisa-runner: offline, throughput-first batch generation with sparsity-aware KV caching."""
