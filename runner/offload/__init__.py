"""Generation with weights, KV and activations placed across tiers (FlexGen's block executor and
ALISA's token phases): `policy` (the job's `offload` section), `executor` (the zig-zag block schedule, an
engine), `scheduled` (layers whose weights live on tiers), `activations`, `placement` (where the executor
keeps KV), `sequence_kv` (FlexGen's per-sequence split), `token_kv` (ALISA's token-tiered cache),
`phases` (ALISA's three phases as functions of the length), `sizing` (the bytes per tier a plan needs:
plain functions the executor's budget check and the cost model share).

May import: `runner.spec`, `runner.units`, `runner.data`, `runner.memory`, `runner.model`, `policies`,
`runner.kv`, `runner.engines`.
"""
