"""Planning: `hardware` (hardware profiles, shipped in `profiles/`), `calibrate` + `measure` (measuring a
profile on this machine through the runner's own code), `cost_model` (predicted time and memory of a
plan: pure functions), `search` (FlexGen's and ALISA's greedy plan searches), `quality` (a quality
budget met from an accuracy grid).

May import every layer below it (`runner.spec`, `runner.units`, data, memory, model, policies, kv,
engines, offload); the cost model imports no executor object, only `offload.sizing` and `offload.phases`.
"""
