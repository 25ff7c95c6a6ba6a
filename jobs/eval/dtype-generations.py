"""Issue 22's greedy gate: the main job's generations in bf16 against fp32, token by token.

Runs `python run.py jobs/smollm2-135m.yaml` once per dtype (same prompts, greedy, the shipped
settings) into results/eval/smollm2-dtype-generations/<dtype>/ and writes compare.csv there: one row
per prompt with both lengths, the tokens that agree before the first difference, and where (token
index and the two tokens' text) they part. Two greedy decoders part for good at their first
different token (each continues its own text), so the first divergence is the measure.

    python jobs/eval/dtype-generations.py            # about 2 minutes on 2 cores
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results/eval/smollm2-dtype-generations"
DTYPES = ("float32", "bfloat16")


def _run(dtype: str) -> dict[str, list[int]]:
    out = OUT / dtype
    subprocess.run([sys.executable, "run.py", "jobs/smollm2-135m.yaml", "--fresh", "--set", f"model.dtype={dtype}",
                    "--set", f"output.dir={out}"], cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: r["completion_token_ids"] for r in rows}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from runner.model.weights import load_model  # the tokenizer, to print the tokens where they part
    import torch
    tok = load_model(name="smollm2-135m", path="auto", dtype=torch.float32, with_weights=False).tokenizer
    ref, other = (_run(d) for d in DTYPES)
    rows = []
    for pid, a in ref.items():
        b = other[pid]
        at = _first_difference(a, b)
        rows.append({"id": pid, "tokens_float32": len(a), "tokens_bfloat16": len(b),
                     "identical": at is None, "agree_tokens": len(a) if at is None else at,
                     "first_diff_float32": None if at is None or at >= len(a) else tok.decode([a[at]]),
                     "first_diff_bfloat16": None if at is None or at >= len(b) else tok.decode([b[at]])})
    table = pd.DataFrame(rows)
    table.to_csv(OUT / "compare.csv", index=False)
    same = int(table["identical"].sum())
    print(f"{same} of {len(table)} completions identical; the others part after "
          f"{table.loc[~table['identical'], 'agree_tokens'].tolist()} tokens; {OUT / 'compare.csv'}")


if __name__ == "__main__":
    main()
