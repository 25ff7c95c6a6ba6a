"""The accuracy harness: model quality (perplexity, multiple-choice accuracy) under each KV policy.

A job with an `eval` section (instead of `dataset`) runs a grid and writes, under output.dir
(default results/<name>/), `accuracy.csv` (one row per point and metric, appended as each point
finishes; a rerun skips the points already there) and `accuracy.png` (quality vs KV sparsity).

    eval:
      task: perplexity            # perplexity | mc
      data: [a.txt, b.txt]        # perplexity: text files, pooled; mc: BIG-bench JSONL files, one result each
      context_len: 2048           # perplexity: window length (default 2048)
      prefill_len: 1024           # perplexity: dense prefix; the rest is decoded and scored (default half)
      windows: 8                  # perplexity: windows, evenly spaced over the text (default 8)
      limit: 100                  # mc: first N questions per file (default all)
      shots: 5                    # mc: k-shot examples from the same file (default 0)
      seed: 0                     # mc: shot draw and choice order
      list_choices: false         # mc: list the choices under each question (BIG-bench style)
      decode_context: 0           # mc: last N context tokens decoded under the policy too
      batch_size: 8               # windows / questions per batch
      policies: [local, swa]      # sparse policies; dense always runs, once per bits
      sparsities: [0.5, 0.8]
      bits: [16, 8]
      mode: retain                # retain | evict
      extra: [{policy: swa, score: decay}]   # more kv mappings; swept over sparsities / bits they omit

CSV columns (`runner.run_eval.ACCURACY_COLUMNS`): job, task, data, model, dtype, kv_policy, kv_label,
sparsity (0 for dense), budget_tokens, bits, mode, score, metric (perplexity | acc | acc_norm),
value, tokens_scored, questions, context_len (mc: mean context tokens), prefill_len, windows, shots,
decode_context, seconds, started_at, git_commit, kv_config and eval_config (canonical settings: with
task, data, model and dtype they are a point's key for resume).

Modules: `spec` is the section (light: the job loader imports it); `perplexity` and `mc` score one
point; `plot` draws it; `runner/run_eval.py` runs the grid (it sits beside `run_job`, as it reads a whole
job and resolves its device).

May import: `runner.spec`, `runner.units`, `runner.data`, `runner.memory`, `runner.model`, `policies`,
`runner.kv`, `runner.engines`.
"""
