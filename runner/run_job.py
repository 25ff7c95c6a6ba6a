"""Run one job end to end: load, read the dataset as a stream, generate batch by batch (runner/run_loop.py),
commit each batch (runner/resume.py), write the reports, return the CSV row."""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import shutil
import signal
from collections.abc import Callable, Iterator

import torch
import yaml

from runner.model import kernels
from runner.data.dataset import DatasetError, Prompt, check_readable, count_records, iter_records
from runner.engines.base import Engine
from runner.job import Device, Engine as EngineKind, JobSpec, OutputOrder
from runner.kv.store import kv_bytes
from runner.data.outputs import append_csv_row, git_commit, peak_rss_bytes, throughput_row, weights_label
from runner.data.reports import plot_report
from runner.resume import GENERATIONS, REJECTS, RunState, locked, open_state, reorder_windows, write_atomic
from runner.run_loop import Loop, RunError, StopRequest, Totals
from runner.engines.sampling import SamplingParams
from runner.model.weights import LoadedModel, available_memory, load_model
from runner.model.int8 import Int8Weight
from runner.planner import resolve_quality, resolve_run, run_dtype
from runner.units import format_gib, gib_to_bytes
from runner.memory.pools import return_freed_memory



def resolve_device(device: Device) -> torch.device:
    if device is Device.CUDA and not torch.cuda.is_available():
        raise RunError("hardware.device: cuda requested but torch sees no CUDA device")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def _make_engine(job: JobSpec, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> Engine:
    if job.engine is EngineKind.HF:
        from runner.engines.hf import HFEngine
        pad = loaded.tokenizer.pad_token_id
        return HFEngine(job.model.path if job.model.path != "auto" else loaded.source.split(":", 1)[1],
                        device, dtype, loaded.tokenizer, pad if pad is not None else 0)
    if job.offload is not None:
        return _offload_engine(job, loaded, device, dtype)
    from runner.engines.alisa import AlisaEngine
    return AlisaEngine(loaded, device, dtype, job.kv.settings(), weight_bits=job.model.weight_bits,
                       decode_rows=job.batch.gpu_batch_size)


def _offload_engine(job: JobSpec, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> Engine:
    from runner.memory.copy_engine import LinkEmulation
    from runner.offload.executor import Executor
    from runner.memory.tiers import TierBudgets
    hw = job.hardware
    budgets = TierBudgets.from_gib(offload_dir=hw.offload_dir, gpu_gib=hw.gpu_gib, cpu_gib=hw.cpu_gib,
                                   disk_gib=hw.disk_gib, disk_page_cache=hw.disk_page_cache)
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
    from runner.memory.tiers import BudgetError, DiskSpaceError
    try:
        yield
    except BudgetError as e:
        raise RunError(f"hardware.{e.tier.value}_gib: {e}; raise it, place less on {e.tier.value} (offload.*_percent), "
                       "or let `offload: auto` plan the tiers") from e
    except DiskSpaceError as e:
        raise RunError(f"hardware.offload_dir: {e}; free space there, choose another offload_dir, or plan for "
                       "less disk (hardware.disk_gib)") from e


# No token of a real vocabulary spans more bytes (the longest are runs of spaces or of one symbol), so a
# prompt of more bytes than the context times this cannot fit.
MAX_BYTES_PER_TOKEN = 64


def prompt_tokenizer(loaded: LoadedModel, max_new_tokens: int) -> Callable[[Prompt], list[int]]:
    """Prompt -> token ids; a prompt the model cannot take raises RunError with the reason (a reject)."""
    limit = loaded.config.max_seq_len
    max_bytes = limit * MAX_BYTES_PER_TOKEN

    def tokenize(p: Prompt) -> list[int]:
        if p.token_ids is None and len(p.text) > max_bytes // 4:  # else it has too few characters to be too long
            size = len(p.text.encode("utf-8", "surrogatepass"))
            if size > max_bytes:  # refused before tokenizing: a 10 MB line would take the tokenizer minutes
                raise RunError(f"prompt too long: {size:,} bytes, more than the model's {limit}-token context "
                               f"can hold at {MAX_BYTES_PER_TOKEN} bytes a token")
        ids = list(p.token_ids) if p.token_ids is not None else loaded.tokenizer.encode(p.text)
        if not ids:
            raise RunError("prompt tokenizes to nothing")
        if len(ids) + max_new_tokens > limit:
            raise RunError(f"prompt too long: {len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the "
                           f"model's {limit}-token context")
        return ids
    return tokenize


def memory_check(job: JobSpec, loaded: LoadedModel, dtype: torch.dtype,
                 device: torch.device) -> Callable[[list[list[int]]], None]:
    """A check run before each batch: refuse one whose KV cache cannot fit (an impossible memory budget)."""
    if job.engine is not EngineKind.ALISA or job.offload is not None:
        return lambda ids: None  # the executor checks its own tier budgets
    held = {id(t): t for t in loaded.weights.values()}.values()  # a tied head counted once
    weights = sum(t.nbytes() if isinstance(t, Int8Weight) else t.numel() * t.element_size() for t in held)
    if _greedy_head(job, device, dtype) == "bf16-screen":
        from runner.engines.alisa import weight_pack
        from runner.engines.lm import screen_copy_bytes
        weights += screen_copy_bytes(loaded.config, dtype, weight_pack(device, dtype, job.batch.gpu_batch_size))
    if job.hardware.memory_gib is not None:
        budget = gib_to_bytes(job.hardware.memory_gib) - weights
        what = f"hardware.memory_gib ({job.hardware.memory_gib:g} GiB minus {format_gib(weights)} of weights)"
    else:
        budget, what = available_memory(device), f"the {format_gib(available_memory(device), 1)} free on {device.type}"

    def check(ids: list[list[int]]) -> None:
        rows, max_len = len(ids), max(len(p) for p in ids) + job.generation.max_new_tokens
        kv = kv_bytes(loaded.config, job.kv.settings(), rows, max_len, dtype)
        if kv > budget:
            raise RunError(f"batch.gpu_batch_size: {rows} sequences of {max_len} tokens need {format_gib(kv)} of "
                           f"KV cache ({job.kv.label()}) but {what} leaves {format_gib(max(budget, 0))}; lower "
                           "the batch, or set kv.mode: evict with kv.sparsity, or kv.bits: 8")
    return check


def sampling_params(job: JobSpec) -> SamplingParams:
    g = job.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
                          top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop=tuple(g.stop), ignore_eos=g.ignore_eos)


def _warm_up(engine: Engine, loaded: LoadedModel, job: JobSpec) -> None:
    # Like FlexGen's warm-up generate: first calls pay for allocator and kernel set-up. With weights on
    # disk a step reads the whole disk share (52 GB for OPT-30B here): one prefill warms up enough.
    ids = [loaded.tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog.")]
    on_disk = job.offload is not None and job.offload.w_gpu_percent + job.offload.w_cpu_percent < 100
    engine.generate(ids, SamplingParams(max_new_tokens=1 if on_disk else 2, ignore_eos=True), None)


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after its last committed batch; `row` is the partial run's CSV row."""

    def __init__(self, row: dict, signum: int, out_dir: os.PathLike) -> None:
        super().__init__(f"interrupted by signal {signum} after {row['num_prompts']} prompts this run; everything "
                         f"finished is kept in {out_dir}: run the same command again to resume")
        self.row, self.signum = row, signum


def run_job(job: JobSpec, *, progress: bool = True, sweep_point: str = "", fresh: bool = False) -> dict:
    """Run `job` into its output dir, resuming what an earlier run of it finished (output.resume, unless
    `fresh`); appends one throughput.csv row for this run and returns it. A job already complete runs
    nothing and returns a row with status "complete" and no prompts, not written to the CSV.
    Raises Interrupted (after writing the row) when SIGINT or SIGTERM stopped it."""
    _check_engine(job)
    budget = job.kv.max_ppl_increase
    job, _ = resolve_quality(job)  # the KV a quality budget picks (run.py prints why), before any load
    try:  # a missing dataset fails now, not after the model loads
        check_readable(job.dataset)
    except DatasetError as e:
        raise RunError(f"dataset.path: {e}") from None
    device = resolve_device(job.hardware.device)
    dtype = run_dtype(job, device)
    job = resolve_run(job, device, dtype)
    if job.hardware.num_threads:
        torch.set_num_threads(job.hardware.num_threads)
    out_dir = _prepare_dir(job)
    with locked(out_dir):  # one run per output dir at a time: a second is refused here, before any work
        return _run_locked(job, out_dir, device, dtype, progress=progress, sweep_point=sweep_point, fresh=fresh,
                           budget=budget)


def _run_locked(job: JobSpec, out_dir: os.PathLike, device: torch.device, dtype: torch.dtype, *, progress: bool,
                sweep_point: str, fresh: bool, budget: float | None) -> dict:
    step = job.batch.gpu_batch_size * (job.batch.num_gpu_batches if job.offload is not None else 1)
    state = open_state(job, job.dataset.bucket or step, fresh=fresh)
    if state.complete:
        return throughput_row(prefill_latency_s=0, decode_latency_s=0, num_prompts=0, prompt_tokens=0,
                              generated_tokens=0, job=job.name, engine=job.engine.value, status="complete",
                              resumed_prompts=state.prompts, rejected_prompts=0, workers=1)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    loaded = _load(job, device, dtype)
    params = sampling_params(job)
    records = iter_records(job.dataset, loaded.tokenizer,
                           default_count=job.batch.gpu_batch_size * job.batch.num_gpu_batches)
    check = memory_check(job, loaded, dtype, device)
    tokenize = prompt_tokenizer(loaded, params.max_new_tokens)
    records = _checked_up_front(job, records, step, tokenize, check)
    engine = _make_engine(job, loaded, device, dtype)
    resumed, stop = state.prompts, StopRequest()
    try:
        with stop.installed(), _budget_errors():
            _warm_up(engine, loaded, job)
            engine.reset_stats()  # the CSV reports the measured run, not the warm-up
            write_atomic(out_dir / "job.yaml", yaml.safe_dump(job.to_dict(), sort_keys=False))
            loop = Loop(job=job, engine=engine, params=params, state=state, step=step, stop=stop, check_batch=check,
                        tokenize=tokenize)
            with _kept_on_failure(state):
                totals = loop.run(records, _progress_total(job), progress)
                if not loop.interrupted:
                    _finish(job, state)
        offload_columns = engine.stats()
    finally:
        engine.close()  # the executor's disk files go, whether the run finished or failed
    _plot(job, state)
    row = _row(job, loaded, totals, device, dtype, started, sweep_point, offload_columns,
               status="interrupted" if loop.interrupted else "complete", resumed=resumed, budget=budget)
    append_csv_row(job.throughput_csv, row)
    if loop.interrupted:
        raise Interrupted(row, stop.signum or signal.SIGINT, out_dir)
    return row


def _load(job: JobSpec, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model, and a job it cannot run at all refused before the dataset is read."""
    # The block executor places weights tensor by tensor into their tiers: never the whole model in RAM.
    loaded = load_model(name=job.model.name, path=job.model.path, dtype=dtype, device=device,
                        seed=job.generation.seed, with_weights=job.engine is EngineKind.ALISA,
                        lazy=job.offload is not None, weight_bits=job.model.weight_bits)
    context, new = loaded.config.max_seq_len, job.generation.max_new_tokens
    if new >= context:  # every prompt would be rejected, one by one, after reading the whole dataset
        raise RunError(f"generation.max_new_tokens: {new} new tokens leave no room for a prompt in "
                       f"{loaded.config.name}'s {context}-token context")
    return loaded


def _checked_up_front(job: JobSpec, records: Iterator, step: int, tokenize: Callable, check: Callable) -> Iterator:
    """Read the first batch's records before the engine is built: an empty dataset, an unreadable file, or a
    batch that cannot fit the memory budget, fails now rather than after warm-up. Later batches are checked
    as they come."""
    head = list(itertools.islice(records, step))
    if not head:
        after = f" after dataset.offset {job.dataset.offset}" if job.dataset.offset else ""
        raise RunError(f"dataset.path: {job.dataset.path} has no records{after}: nothing to run")
    ids = []
    for p in (r for r in head if isinstance(r, Prompt)):
        with contextlib.suppress(RunError):  # a prompt the model cannot take is a reject, in the loop
            ids.append(tokenize(p))
    if ids:
        check(ids)
    return itertools.chain(head, records)


def _check_engine(job: JobSpec) -> None:
    if job.engine is EngineKind.HF and job.model.path == "dummy":
        raise RunError("engine: hf needs real weights (a checkpoint directory, .gguf file or auto), not dummy")
    if job.engine is EngineKind.HF and job.kv != type(job.kv)():
        raise RunError("kv: the hf engine runs transformers' dense cache; remove the kv section or use engine: alisa")


_MIN_FREE_BYTES = 64 * 2 ** 20  # below this a night of outputs would stop on a full disk within minutes


def _prepare_dir(job: JobSpec) -> os.PathLike:
    """The output dir, created; refused up front when it cannot be written or its disk is (nearly) full."""
    out_dir = job.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"output.dir: cannot create {out_dir} ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise RunError(f"output.dir: {out_dir} is not writable")
    if job.offload is not None:  # the executor's disk tier lives there, whatever the placement
        try:
            # 0700 (when created here): it holds the disk tier, weights and the prompts' KV, in run
            # directories that are 0700 themselves (runner/memory/pools.py).
            os.makedirs(job.hardware.offload_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RunError(f"hardware.offload_dir: cannot create {job.hardware.offload_dir} ({e.strerror})") from None
        if not os.access(job.hardware.offload_dir, os.W_OK):
            raise RunError(f"hardware.offload_dir: {job.hardware.offload_dir} is not writable")
    _check_csv(job.throughput_csv)
    free = shutil.disk_usage(out_dir).free
    if free < _MIN_FREE_BYTES:
        raise RunError(f"output.dir: {out_dir} has only {free / 2 ** 20:.1f} MiB free; free some space or "
                       "choose another output.dir")
    return out_dir


def _check_csv(path: os.PathLike) -> None:
    """output.csv must take the run's row: found now, not after the night's work (the row is written last)."""
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise RunError(f"output.csv: cannot create or append to {path} ({e.strerror})") from None
    if not existed:
        os.unlink(path)  # a run refused later writes no row, so it leaves no empty CSV either


@contextlib.contextmanager
def _kept_on_failure(state: RunState) -> Iterator[None]:
    """A run that fails mid-way (disk full, a batch that does not fit) stops with what it committed kept."""
    try:
        yield
    except OSError as e:
        where = e.filename or state.out_dir
        with contextlib.suppress(OSError):
            state.rollback()
        raise RunError(f"{where}: {e.strerror or e}; the {state.prompts} prompts finished so far are kept in "
                       f"{state.out_dir}: fix this and run the same command again to resume") from None
    except (RunError, DatasetError) as e:
        if state.prompts:
            raise RunError(f"{e} (the {state.prompts} prompts finished so far are kept in {state.out_dir}; "
                           "the same command resumes)") from None
        raise


def _finish(job: JobSpec, state: RunState) -> None:
    """Every record is done: put the generations in dataset order if asked, and mark the run complete.
    A dataset whose every record was rejected ran nothing: an error, not a complete run."""
    if not state.prompts and job.dataset.shard_count == 1:  # a Ray shard may own no window at all
        raise RunError(f"dataset: all {state.rejects} records were rejected, nothing ran; "
                       f"{state.out_dir / REJECTS} says why")
    if job.dataset.bucket and job.output.order is OutputOrder.DATASET:
        reorder_windows(state.out_dir / GENERATIONS, state.window)
    state.complete, state.limit = True, job.dataset.limit
    if job.output.resume:
        state.commit()


def _progress_total(job: JobSpec) -> int | None:
    total = count_records(job.dataset, default_count=job.batch.gpu_batch_size * job.batch.num_gpu_batches)
    return None if total is None else -(-total // job.dataset.shard_count)


def _plot(job: JobSpec, state: RunState) -> None:
    return_freed_memory()  # the last batch's KV cache: drawing should not add to the run's peak RSS
    if state.batches:  # this run's and earlier ones'
        plot_report(state.out_dir / "batches.csv", state.out_dir / "report.png", f"{job.name}: {job.model.name or job.model.path}, "
                    f"{job.kv.label()}, batch {job.batch.gpu_batch_size} x {job.batch.num_gpu_batches}")


def _row(job: JobSpec, loaded: LoadedModel, totals: Totals, device: torch.device, dtype: torch.dtype, started: str,
         sweep_point: str, offload_columns: dict, *, status: str, resumed: int, budget: float | None) -> dict:
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return throughput_row(
        prefill_latency_s=totals.prefill_s, decode_latency_s=totals.decode_s, num_prompts=totals.prompts,
        prompt_tokens=totals.prompt_tokens, generated_tokens=totals.generated_tokens,
        job=job.name, engine=job.engine.value, model=loaded.config.name, dtype=weights_label(dtype, job.model.weight_bits),
        device=device.type, kv_policy=job.kv.policy, gpu_batch_size=job.batch.gpu_batch_size,
        num_gpu_batches=job.batch.num_gpu_batches, peak_gpu_bytes=peak_gpu, peak_cpu_bytes=peak_rss_bytes(),
        started_at=started, git_commit=git_commit(),
        kv_bytes_per_token=totals.kv_bytes_per_token or
        loaded.config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()),
        num_threads=torch.get_num_threads(), sweep_point=sweep_point, kv_mode=job.kv.mode.value,
        decode_attention=(kernels.decode_attention_kernel(loaded.config.head_dim, device, dtype)
                          if job.engine is EngineKind.ALISA else ""),
        greedy_head=_greedy_head(job, device, dtype),
        kv_sparsity=job.kv.sparsity, kv_budget_tokens=job.kv.budget_tokens, kv_bits=job.kv.bits,
        kv_peak_bytes=totals.kv_peak_bytes, kv_max_ppl_increase=budget, **_link_columns(job), **offload_columns,
        **{f"kv_{phase}_s": round(s, 4) for phase, s in totals.kv_phase_s.items()},
        status=status, resumed_prompts=resumed, rejected_prompts=totals.rejects, workers=1,
        **_predicted(job, loaded, totals, device, dtype))


def _greedy_head(job: JobSpec, device: torch.device, dtype: torch.dtype) -> str:
    """The CSV's greedy_head: how our engine chose greedy tokens (`runner.model.greedy_head`)."""
    if job.engine is not EngineKind.ALISA or job.generation.do_sample:
        return ""
    if job.offload is not None:
        from runner.offload.executor import screens_greedy
        return "bf16-screen" if screens_greedy(device, dtype) else "full"
    screened = kernels.bf16_screen(device, dtype)
    return "bf16-screen" if screened else "full"


def _predicted(job: JobSpec, loaded: LoadedModel, totals: Totals, device: torch.device, dtype: torch.dtype) -> dict:
    if not totals.prompts:
        return {}
    from runner.planner import predicted_columns
    return predicted_columns(job, loaded.config, (totals.max_prompt_len, totals.prompts), device, dtype)
