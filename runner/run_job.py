"""Run one job end to end: load, tokenize, generate batch by batch, write outputs, return the CSV row."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from runner.dataset import Prompt, load_prompts
from runner.engines import Engine
from runner.generate import BatchOutput
from runner.job import Device, DType, Engine as EngineKind, JobSpec
from runner.outputs import GenerationRecord, append_csv_row, git_commit, peak_rss_bytes, throughput_row, \
    write_generations
from runner.sampling import SamplingParams
from runner.kv_store import kv_bytes
from runner.reports import BatchLog, plot_report
from runner.weights import LoadedModel, available_memory, load_model

_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


class RunError(ValueError):
    """A job that cannot run as specified; the message names the job field or prompt."""


def resolve_device(device: Device) -> torch.device:
    if device is Device.CUDA and not torch.cuda.is_available():
        raise RunError("hardware.device: cuda requested but torch sees no CUDA device")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.AUTO:
        # This CPU class has no fast bf16/fp16 matmul (see docs): fp32 there, fp16 on CUDA.
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


@dataclass
class Totals:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompts: int = 0
    kv_peak_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_phase_s: dict = field(default_factory=dict)

    def add(self, out: BatchOutput) -> None:
        self.prefill_s += out.prefill_s
        self.decode_s += out.decode_s
        self.prompt_tokens += out.prompt_tokens
        self.generated_tokens += out.generated_tokens
        self.prompts += len(out.sequences)
        self.kv_peak_bytes = max(self.kv_peak_bytes, out.kv_bytes)
        self.kv_bytes_per_token = out.kv_bytes_per_token or self.kv_bytes_per_token
        for phase, seconds in out.kv_phase_s.items():
            self.kv_phase_s[phase] = self.kv_phase_s.get(phase, 0.0) + seconds


def _make_engine(job: JobSpec, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> Engine:
    if job.engine is EngineKind.HF:
        from runner.engines.hf import HFEngine
        pad = loaded.tokenizer.pad_token_id
        return HFEngine(job.model.path if job.model.path != "auto" else loaded.source.split(":", 1)[1],
                        device, dtype, loaded.tokenizer, pad if pad is not None else 0)
    if job.offload is not None:
        return _offload_engine(job, loaded, device, dtype)
    from runner.engines.alisa import AlisaEngine
    return AlisaEngine(loaded, device, dtype, job.kv.settings())


def _offload_engine(job: JobSpec, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> Engine:
    from runner.copy_engine import LinkEmulation
    from runner.executor import Executor
    from runner.memory import TierBudgets
    hw = job.hardware
    budgets = TierBudgets.from_gb(offload_dir=hw.offload_dir, gpu_gb=hw.gpu_gb, cpu_gb=hw.cpu_gb, disk_gb=hw.disk_gb,
                                  disk_page_cache=hw.disk_page_cache)
    link = LinkEmulation(gbps=hw.link.gbps) if hw.link is not None and hw.link.emulate else None
    with _budget_errors():
        executor = Executor(loaded.config, loaded.weights, loaded.tokenizer, policy=job.offload, budgets=budgets,
                            device=device, dtype=dtype, kv=job.kv.settings(), gpu_batch_size=job.batch.gpu_batch_size,
                            num_gpu_batches=job.batch.num_gpu_batches, link=link)
    # The executor copied every weight into its tiers; the loaded copies would only double the resident
    # weights (measured +0.34 GB peak RSS on SmolLM2 in executor-overhead).
    loaded.weights.clear()
    return executor


def _link_columns(job: JobSpec) -> dict:
    """The link the row was measured under (`hardware.link`); no columns without one."""
    link = job.hardware.link
    return {} if link is None else {"link_gbps": link.gbps, "link_emulated": link.emulate}


@contextlib.contextmanager
def _budget_errors() -> Iterator[None]:
    """A tier budget the executor's plan does not fit is a job error naming the budget's key."""
    from runner.memory import BudgetError
    try:
        yield
    except BudgetError as e:
        raise RunError(f"hardware.{e.tier.value}_gb: {e}") from e


def tokenize_prompts(prompts: list[Prompt], loaded: LoadedModel, max_new_tokens: int) -> list[list[int]]:
    limit = loaded.config.max_seq_len
    out = []
    for p in prompts:
        ids = list(p.token_ids) if p.token_ids is not None else loaded.tokenizer.encode(p.text)
        if not ids:
            raise RunError(f"dataset line {p.line} (id {p.id!r}): prompt tokenizes to nothing")
        if len(ids) + max_new_tokens > limit:
            raise RunError(f"dataset line {p.line} (id {p.id!r}): {len(ids)} prompt tokens + "
                           f"{max_new_tokens} new tokens exceed the model's {limit}-token context")
        out.append(ids)
    return out


def check_memory(job: JobSpec, loaded: LoadedModel, ids: list[list[int]], dtype: torch.dtype,
                 device: torch.device) -> None:
    """Refuse, before any work, a batch whose KV cache cannot fit (an impossible memory budget)."""
    rows = min(job.batch.gpu_batch_size, len(ids))
    max_len = max(len(p) for p in ids) + job.generation.max_new_tokens
    kv = kv_bytes(loaded.config, job.kv.settings(), rows, max_len, dtype)
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in loaded.weights.values()}.values())
    gib = 2 ** 30
    if job.hardware.memory_gb is not None:
        budget, what = job.hardware.memory_gb * gib - weights, f"hardware.memory_gb ({job.hardware.memory_gb:g} GiB"
        what += f" minus {weights / gib:.2f} GiB of weights)"
    else:
        budget, what = available_memory(device), f"the {available_memory(device) / gib:.1f} GiB free on {device.type}"
    if kv > budget:
        raise RunError(f"batch.gpu_batch_size: {rows} sequences of {max_len} tokens need {kv / gib:.2f} GiB of KV "
                       f"cache ({job.kv.label()}) but {what} leaves {max(budget, 0) / gib:.2f} GiB; lower the "
                       "batch, or set kv.mode: evict with kv.sparsity, or kv.bits: 8")


def sampling_params(job: JobSpec) -> SamplingParams:
    g = job.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
                          top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop=tuple(g.stop), ignore_eos=g.ignore_eos)


def _warm_up(engine: Engine, loaded: LoadedModel) -> None:
    # Like FlexGen's warm-up generate: first calls pay for allocator and kernel set-up.
    ids = [loaded.tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog.")]
    engine.generate(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), None)


def run_job(job: JobSpec, *, progress: bool = True, sweep_point: str = "") -> dict:
    """Run `job`; writes generations.jsonl, job.yaml and one throughput.csv row, and returns the row."""
    if job.engine is EngineKind.HF and job.model.path == "dummy":
        raise RunError("engine: hf needs real weights (a checkpoint directory, .gguf file or auto), not dummy")
    if job.engine is EngineKind.HF and job.kv != type(job.kv)():
        raise RunError("kv: the hf engine runs transformers' dense cache; remove the kv section or use engine: alisa")
    job = _resolved(job)
    device = resolve_device(job.hardware.device)
    dtype = resolve_dtype(job.model.dtype, device)
    if job.hardware.num_threads:
        torch.set_num_threads(job.hardware.num_threads)
    out_dir = job.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise RunError(f"output.dir: {out_dir} is not writable")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    loaded = load_model(name=job.model.name, path=job.model.path, dtype=dtype, device=device,
                        seed=job.generation.seed, with_weights=job.engine is EngineKind.ALISA)
    params = sampling_params(job)
    prompts = load_prompts(job.dataset, loaded.tokenizer,
                           default_count=job.batch.gpu_batch_size * job.batch.num_gpu_batches)
    ids = tokenize_prompts(prompts, loaded, params.max_new_tokens)
    if job.engine is EngineKind.ALISA and job.offload is None:  # the executor checks its own tier budgets
        check_memory(job, loaded, ids, dtype, device)
    engine = _make_engine(job, loaded, device, dtype)
    try:
        with _budget_errors():
            _warm_up(engine, loaded)
            offload_stats = getattr(engine, "reset_stats", None)
            if offload_stats is not None:
                offload_stats()  # the CSV reports the measured run, not the warm-up
            (out_dir / "job.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
            gen_path = out_dir / "generations.jsonl"
            gen_path.write_text("")
            totals = _generate_all(engine, prompts, ids, job, params, gen_path, progress)
        offload_columns = engine.stats() if offload_stats is not None else {}
    finally:
        if hasattr(engine, "close"):
            engine.close()  # the executor's disk files go, whether the run finished or failed
    if device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device)
    else:
        peak_gpu = 0  # no accelerator: everything lives in host memory, reported as peak_cpu_bytes
    row = throughput_row(
        prefill_latency_s=totals.prefill_s, decode_latency_s=totals.decode_s, num_prompts=totals.prompts,
        prompt_tokens=totals.prompt_tokens, generated_tokens=totals.generated_tokens,
        job=job.name, engine=job.engine.value, model=loaded.config.name, dtype=str(dtype).removeprefix("torch."),
        device=device.type, kv_policy=job.kv.policy, gpu_batch_size=job.batch.gpu_batch_size,
        num_gpu_batches=job.batch.num_gpu_batches, peak_gpu_bytes=peak_gpu, peak_cpu_bytes=peak_rss_bytes(),
        started_at=started, git_commit=git_commit(),
        kv_bytes_per_token=totals.kv_bytes_per_token or
        loaded.config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()),
        num_threads=torch.get_num_threads(), sweep_point=sweep_point, kv_mode=job.kv.mode.value,
        kv_sparsity=job.kv.sparsity, kv_budget_tokens=job.kv.budget_tokens, kv_bits=job.kv.bits,
        kv_peak_bytes=totals.kv_peak_bytes, **_link_columns(job), **offload_columns,
        **{f"kv_{phase}_s": round(s, 4) for phase, s in totals.kv_phase_s.items()},
        **_predicted(job, loaded, ids, device, dtype))
    append_csv_row(job.throughput_csv, row)
    return row


def _resolved(job: JobSpec) -> JobSpec:
    """`offload: auto`: the plan search fills in the offload policy (and with `batch: auto` the batch shape)."""
    if not job.auto_offload:
        return job
    from runner.planner import resolve_auto
    return resolve_auto(job)


def _predicted(job: JobSpec, loaded: LoadedModel, ids: list[list[int]], device: torch.device,
               dtype: torch.dtype) -> dict:
    from runner.planner import predicted_columns
    return predicted_columns(job, loaded.config, (max(len(i) for i in ids), len(ids)), device, dtype)


def _generate_all(engine: Engine, prompts: list[Prompt], ids: list[list[int]], job: JobSpec,
                  params: SamplingParams, gen_path: Path, progress: bool) -> Totals:
    totals = Totals()
    # The executor takes a whole block (num_gpu_batches GPU batches) per call.
    step = job.batch.gpu_batch_size * (job.batch.num_gpu_batches if job.offload is not None else 1)
    generator = torch.Generator().manual_seed(params.seed)
    bar = tqdm(total=len(prompts), unit="prompt", disable=not progress, dynamic_ncols=True)
    log, started = BatchLog(gen_path.parent / "batches.csv"), time.perf_counter()
    # A block is num_gpu_batches GPU batches (FlexGen's effective batch); on one device
    # with everything resident the GPU batches simply run one after another.
    for start in range(0, len(prompts), step):
        out = engine.generate(ids[start:start + step], params, generator)
        totals.add(out)
        records = [GenerationRecord(id=p.id, prompt=p.text, completion=s.text, completion_token_ids=s.token_ids,
                                    finish_reason=s.finish_reason)
                   for p, s in zip(prompts[start:start + step], out.sequences)]
        write_generations(gen_path, records, append=True)
        log.append(_batch_row(engine, out, time.perf_counter() - started))
        bar.update(len(records))
        elapsed = totals.prefill_s + totals.decode_s
        bar.set_postfix(tok_s=f"{totals.generated_tokens / elapsed:.1f}" if elapsed else "-")
    bar.close()
    plot_report(log.path, gen_path.parent / "report.png", f"{job.name}: {job.model.name or job.model.path}, "
                f"{job.kv.label()}, batch {job.batch.gpu_batch_size} x {job.batch.num_gpu_batches}")
    return totals


def _batch_row(engine: Engine, out: BatchOutput, elapsed: float) -> dict:
    """One batches.csv row: the batch's tokens and seconds, and the run's memory peaks so far."""
    seconds = out.prefill_s + out.decode_s
    row = {"prompts": len(out.sequences), "prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
           "prefill_s": round(out.prefill_s, 6), "decode_s": round(out.decode_s, 6),
           "tokens_per_s": round(out.generated_tokens / seconds, 3) if seconds else 0.0,
           "elapsed_s": round(elapsed, 3), "peak_rss_bytes": peak_rss_bytes(),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}
    if hasattr(engine, "reset_stats"):  # the block executor: its tier pools' peaks
        stats = engine.stats()
        row.update({k: stats[k] for k in ("peak_gpu_pool_bytes", "peak_cpu_pool_bytes", "peak_disk_bytes")})
    return row
