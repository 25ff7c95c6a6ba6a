"""Jobs meet the cost model: a job's workload and plan, `--plan`'s report (ALISA's and FlexGen's
searched plans side by side, and the job's own), `offload: auto`, and the predicted columns every
run's CSV row carries beside the measured ones. No weights are loaded here.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.data.outputs import PREDICTED_THROUGHPUT_COLUMNS, git_commit
from runner.model.config import PRESETS, ModelConfig
from runner.model import kernels
from runner.model.layers import num_params
from runner.model.weights import available_memory
from runner.plan.cost_model import Plan, Prediction, Workload, predict
from runner.plan.hardware import HardwareProfile, PROFILE_DIR, load_profile
from runner.plan.quality import QualityChoice, choose
from runner.job import DatasetFormat, DType, Engine, JobSpec
from runner.kv.spec import KVMode, QuantAxis
from runner.memory.tiers import Tier
from runner.offload.policy import KVPlacement, OffloadPolicy
from runner.plan.search import SearchResult, budgets_from, search_alisa, search_flexgen
from runner.units import bytes_to_gib, gib_to_bytes

CPU_PROFILE = "cpu-only"  # the profile a CPU run's predicted columns use when its job names none
# Share of MemAvailable a CPU run's `offload: auto` plans the tiers into (the profile's usable_fraction
# applies on top): the rest is for the page cache the disk tier streams through, per-op temporaries
# the tiers do not account, the tokenizer and the interpreter.
RUN_RAM_SHARE = 0.8


class PlanError(ValueError):
    """A job the planner cannot plan; the message names the job field."""


@dataclass(frozen=True)
class PlanReport:
    profile: HardwareProfile
    budgets: dict[Tier, float]  # bytes
    job_plan: Plan
    job_prediction: Prediction | None  # None with offload: auto (the job has no plan of its own yet)
    job_fits: bool  # the job's own plan within every budget
    dtype: torch.dtype  # the compute dtype planned (as a run on the profile's machine resolves `dtype: auto`)
    alisa: SearchResult | None
    flexgen: SearchResult | None
    kv_label: str  # the KV planned: the job's, or what its quality budget picked
    quality: QualityChoice | None  # what kv.max_ppl_increase picked, if the job states one


def resolve_quality(job: JobSpec) -> tuple[JobSpec, QualityChoice | None]:
    """`kv.max_ppl_increase`: the job with the sparsity and bits its model's accuracy grid says meet the
    budget (runner.plan.quality), and the choice; a job without a budget unchanged. Reads one CSV, no weights:
    a budget nothing meets fails here, before any model load."""
    if job.kv.max_ppl_increase is None:
        return job, None
    dtype = None if job.model.dtype is DType.AUTO else job.model.dtype.value
    choice = choose(job.kv, job.model.name or Path(job.model.path).stem, dtype)
    return dataclasses.replace(job, kv=choice.kv(job.kv)), choice


def job_profile(job: JobSpec, name: str | None = None) -> HardwareProfile:
    """The job's profile (or `name`), its gpu<->cpu bandwidth replaced by the job's `hardware.link`
    (a real or emulated link) when it states one."""
    profile = load_profile(name or job.hardware.profile)
    if job.hardware.link is None:
        return profile
    bw = dataclasses.replace(profile.bandwidth_gbps, gpu_from_cpu=job.hardware.link.gbps,
                             cpu_from_gpu=job.hardware.link.gbps)
    return dataclasses.replace(profile, bandwidth_gbps=bw)


def model_config(job: JobSpec) -> ModelConfig:
    """The architecture without weights: a preset by name, else the checkpoint's own config."""
    if job.model.name in PRESETS and (job.model.path in ("auto", "dummy") or not Path(job.model.path).exists()):
        return PRESETS[job.model.name]
    from runner.model.weights import load_model
    return load_model(name=job.model.name, path=job.model.path, dtype=torch.float32, with_weights=False).config


def prompt_shape(job: JobSpec, cfg: ModelConfig) -> tuple[int, int]:
    """(prompt length, prompt count): synthetic prompts as specified, others tokenized (longest)."""
    ds = job.dataset
    block = job.batch.gpu_batch_size * job.batch.num_gpu_batches
    if ds.format is DatasetFormat.SYNTHETIC:
        return ds.prompt_len, ds.num_prompts or block
    from runner.data.dataset import load_prompts
    from runner.model.weights import load_model
    tok = load_model(name=job.model.name, path=job.model.path, dtype=torch.float32, with_weights=False).tokenizer
    ids = [tok.encode(p.text) for p in load_prompts(ds, tok)]
    return max(len(i) for i in ids), len(ids)


def plan_dtype(job: JobSpec, profile: HardwareProfile) -> torch.dtype:
    """The dtype a run on the profile's machine uses (`runner.job.DType.torch_dtype`, as runs resolve it)."""
    return job.model.dtype.torch_dtype(profile.accelerator, native_bf16=profile.native_bf16)


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's matrices in `dtype` (a tied head once): what must fit for a plain run."""
    return num_params(cfg) * dtype.itemsize


def job_workload(job: JobSpec, cfg: ModelConfig, profile: HardwareProfile,
                 shape: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> Workload:
    prompt_len, count = shape or prompt_shape(job, cfg)
    return Workload(cfg=cfg, prompt_len=prompt_len, gen_len=job.generation.max_new_tokens, num_prompts=count,
                    dtype=dtype or plan_dtype(job, profile), kv=job.kv.settings())


def run_profile(job: JobSpec, device: torch.device, *, this_machine: bool = False) -> HardwareProfile | None:
    """The profile a run on `device` plans and predicts with: the job's when it describes that kind of
    device; on a CPU otherwise the shipped cpu-only one (a GPU profile's figures say nothing about this
    CPU); None when there is none. `this_machine`: memory is what this machine has now (a share of
    MemAvailable for the gpu and cpu tiers, which share RAM here, and the offload directory's free
    space), so that `offload: auto` plans for the machine the run is given."""
    name = job.hardware.profile
    if device.type == "cpu" and (name is None or job_profile(job).accelerator):
        name = CPU_PROFILE if (PROFILE_DIR / f"{CPU_PROFILE}.yaml").exists() else None
    if name is None:
        return None
    profile = job_profile(job, name)
    if not this_machine or device.type != "cpu":
        return profile
    ram = bytes_to_gib(available_memory(device) * RUN_RAM_SHARE)
    where = Path(job.hardware.offload_dir).absolute()
    while not where.exists():  # created when the run starts: its filesystem is the nearest existing parent's
        where = where.parent
    disk = bytes_to_gib(shutil.disk_usage(where).free)
    memory = dataclasses.replace(profile.memory_gib, gpu=ram, cpu=ram, disk=disk)
    return dataclasses.replace(profile, memory_gib=memory)


def job_plan(job: JobSpec) -> Plan:
    return Plan(gpu_batch_size=job.batch.gpu_batch_size, num_gpu_batches=job.batch.num_gpu_batches,
                offload=job.offload)


def _budgets(job: JobSpec, profile: HardwareProfile) -> dict[Tier, float]:
    hw = job.hardware
    return budgets_from(profile, hw.gpu_gib, hw.cpu_gib, hw.disk_gib)


def _alisa_ready(w: Workload) -> bool:
    """Token placement needs retained KV grouped along the head dim."""
    kv = w.kv
    return kv.mode is KVMode.RETAIN and (kv.bits == 16 or kv.quant_axis is QuantAxis.HIDDEN)


def plan_job(job: JobSpec) -> PlanReport:
    """The job's own plan predicted, and the searched ALISA and FlexGen plans, on its profile (with the KV
    its quality budget picks, if it states one)."""
    job, quality = resolve_quality(job)
    if job.hardware.profile is None:
        raise PlanError("hardware.profile: required to plan (a shipped profile such as t4-16g, or a YAML path)")
    if job.engine is not Engine.ALISA:
        raise PlanError("engine: the planner models the alisa engine")
    profile = job_profile(job)
    cfg = model_config(job)
    w = job_workload(job, cfg, profile)
    budgets = _budgets(job, profile)
    plan = job_plan(job)
    own = None if job.auto_offload else predict(w, plan, profile)
    fits = own is not None and all(own.peak_bytes[t] <= budgets[t] for t in budgets)
    shape = _batch_shape(job)
    return PlanReport(profile=profile, budgets=budgets, job_plan=plan, job_prediction=own, job_fits=fits,
                      dtype=w.dtype,
                      alisa=search_alisa(w, profile, budgets, pick_buffer=_pinned_picks(job), **shape)
                      if _alisa_ready(w) else None,
                      flexgen=search_flexgen(w, profile, budgets, **shape), kv_label=job.kv.label(),
                      quality=quality)


def _pinned_picks(job: JobSpec) -> bool | None:
    """A job whose own token plan gathers its picks (`offload.pick_buffer: false`, ALISA Alg. 2's data
    path) has the ALISA search keep that path; otherwise the search picks the faster of the two."""
    own = job.offload
    return False if own is not None and own.kv_placement is KVPlacement.TOKEN and not own.pick_buffer else None


def _batch_shape(job: JobSpec) -> dict:
    """The batch shape the search keeps: the job's, unless it says `batch: auto`."""
    if job.auto_batch:
        return {}
    return {"gpu_batch_size": job.batch.gpu_batch_size, "num_gpu_batches": job.batch.num_gpu_batches}


def plan_sections(plan: Plan) -> dict:
    """The plan as job sections a user can paste: batch, and offload's non-default fields."""
    out: dict = {"batch": {"gpu_batch_size": plan.gpu_batch_size, "num_gpu_batches": plan.num_gpu_batches}}
    if plan.offload is not None:
        defaults = OffloadPolicy().to_dict()  # enums as their values, as in the plan's own dict
        out["offload"] = {k: v for k, v in plan.offload.to_dict().items() if v != defaults[k]}
    return out


def resolve_auto(job: JobSpec, profile: HardwareProfile | None = None, dtype: torch.dtype | None = None) -> JobSpec:
    """`offload: auto`: the job with the fastest predicted plan that keeps its KV policy: ALISA's token
    placement, or FlexGen's per-sequence placement of the same KV; on `profile` (default: the job's) in
    `dtype` (default: as a run on the profile's machine would pick)."""
    profile = profile or job_profile(job)
    w = job_workload(job, model_config(job), profile, dtype=dtype)
    budgets = _budgets(job, profile)
    shape = _batch_shape(job)
    found = [r for r in (search_alisa(w, profile, budgets, **shape) if _alisa_ready(w) else None,
                         search_flexgen(w, profile, budgets, keep_kv=True, **shape) if _sequence_ready(w) else None)
             if r]
    if not found:
        raise PlanError(f"offload: auto: no plan fits the budgets of hardware.profile {profile.name} (and "
                        f"hardware.*_gib) in {str(w.dtype).removeprefix('torch.')}; {_fix_hint(job, w)}")
    best = max(found, key=lambda r: r.prediction.total_throughput)
    batch = dataclasses.replace(job.batch, gpu_batch_size=best.plan.gpu_batch_size,
                                num_gpu_batches=best.plan.num_gpu_batches)
    resolved = dataclasses.replace(job, batch=batch, offload=best.plan.offload)
    object.__setattr__(resolved, "auto_offload", False)
    return resolved


def _fix_hint(job: JobSpec, w: Workload) -> str:
    """What would make a plan fit, most effective first: a 16-bit dtype, then disk, then a smaller block."""
    hints = []
    if w.dtype == torch.float32:
        hints.append("set model.dtype: bfloat16 (half the bytes)")
    if job.hardware.disk_gib is not None:
        hints.append("raise hardware.disk_gib")
    hints.append("lower batch.gpu_batch_size / num_gpu_batches (or batch: auto), or the prompt or "
                 "generation length")
    return "; or ".join(hints)


def _sequence_ready(w: Workload) -> bool:
    """FlexGen's split stores KV in the compute dtype (retained, or evict's kept slots)."""
    return w.kv.bits == 16


def predicted_columns(job: JobSpec, cfg: ModelConfig, shape: tuple[int, int], device: torch.device,
                      dtype: torch.dtype) -> dict:
    """predicted_* throughput columns for a run, on its `run_profile`; none for the hf engine or when
    there is no profile to use."""
    profile = run_profile(job, device)
    if profile is None or job.engine is not Engine.ALISA:
        return {}
    w = Workload(cfg=cfg, prompt_len=shape[0], gen_len=job.generation.max_new_tokens, num_prompts=shape[1],
                 dtype=dtype, kv=job.kv.settings())
    p = predict(w, job_plan(job), profile)
    return {"predicted_profile": profile.name, **_predicted_throughputs(p, 2)}


def _predicted_throughputs(p: Prediction, digits: int) -> dict[str, float]:
    """The predicted_* throughput columns (runner.data.outputs.PREDICTED_THROUGHPUT_COLUMNS) of `p`."""
    values = (p.prefill_throughput, p.decode_throughput, p.total_throughput)
    return dict(zip(PREDICTED_THROUGHPUT_COLUMNS, (round(v, digits) for v in values), strict=True))


def plan_rows(report: PlanReport, job: JobSpec, sweep_point: str = "") -> list[dict]:
    """One CSV row per candidate of a `--plan` report: the plan's fields and its prediction."""
    rows, model, commit = [], model_config(job).name, git_commit()
    for name, plan, pred, result in (("job", report.job_plan, report.job_prediction, None),
                                     ("alisa", *_found(report.alisa)), ("flexgen", *_found(report.flexgen))):
        row = {"job": job.name, "sweep_point": sweep_point, "candidate": name, "profile": report.profile.name,
               "model": model, "kv": report.kv_label, "kv_max_ppl_increase": job.kv.max_ppl_increase,
               "dtype": str(report.dtype).removeprefix("torch."),
               "fits": report.job_fits if name == "job" else pred is not None, "git_commit": commit}
        if plan is not None:
            row.update(gpu_batch_size=plan.gpu_batch_size, num_gpu_batches=plan.num_gpu_batches)
            row.update({f"offload.{k}": v for k, v in plan_sections(plan).get("offload", {}).items()})
        if pred is not None:
            row.update(**_predicted_throughputs(pred, 3), bound=pred.bound,
                       **{f"peak_{t.value}_bytes": n for t, n in pred.peak_bytes.items()},
                       **{f"phase{i}_s": round(x, 3) for i, x in enumerate(pred.phase_s, start=1)})
        if result is not None:
            row.update(evaluated=result.evaluated, search_s=round(result.seconds, 3))
        rows.append(row)
    return rows


def _found(result: SearchResult | None) -> tuple:
    return (None, None, None) if result is None else (result.plan, result.prediction, result)


# ---------------------------------------------------------------- what a run on this machine runs

def resolve_dtype(dtype: DType, device: torch.device, *, native_bf16: bool | None = None) -> torch.dtype:
    """The run's compute dtype (`DType.torch_dtype`): `native_bf16` defaults to whether this CPU has
    native bf16 dot products (`kernels.native_bf16`)."""
    native = kernels.native_bf16() if native_bf16 is None else native_bf16
    return dtype.torch_dtype(accelerator=device.type == "cuda", native_bf16=native)


def run_dtype(job: JobSpec, device: torch.device) -> torch.dtype:
    """`resolve_dtype` for the job's engine: the `hf` baseline's `auto` is transformers' stock CPU path,
    fp32 (a bench that wants HF in bf16 says `dtype: bfloat16`)."""
    return resolve_dtype(job.model.dtype, device, native_bf16=False if job.engine is Engine.HF else None)


def resolve_run(job: JobSpec, device: torch.device, dtype: torch.dtype) -> JobSpec:
    """`offload: auto` (and a plain alisa job whose weights do not fit in memory): the plan search fills
    in the offload policy (with `batch: auto` the batch shape too), on the run's profile
    (`runner.planner.run_profile`: on a CPU, this machine's memory and disk)."""
    if job.engine is not Engine.ALISA or job.eval is not None:
        return job
    if not job.auto_offload and (job.offload is not None or _fits_plainly(job, device, dtype)):
        return job
    profile = run_profile(job, device, this_machine=True)
    if profile is None:
        raise PlanError("hardware.profile: the model does not fit in memory and offload: auto needs a profile of "
                        "this machine to plan with (a shipped one such as h100-80g, or `run.py calibrate`)")
    if job.auto_offload:
        return resolve_auto(job, profile, dtype)
    # The plain job does not fit: plan it as `offload: auto`, and if its batch shape cannot fit either,
    # with `batch: auto` (every prompt still runs, in blocks this machine can hold).
    memory = job.hardware.memory_gib  # the plain engine's budget: the tiers share it here
    if memory is not None:
        profile = dataclasses.replace(profile, memory_gib=dataclasses.replace(
            profile.memory_gib, gpu=min(profile.memory_gib.gpu, memory), cpu=min(profile.memory_gib.cpu, memory)))
    hardware = dataclasses.replace(job.hardware, memory_gib=None, profile=job.hardware.profile or profile.name)
    job = dataclasses.replace(job, offload="auto", hardware=hardware)
    try:
        return resolve_auto(job, profile, dtype)
    except PlanError:
        return resolve_auto(dataclasses.replace(job, batch="auto", offload="auto"), profile, dtype)


def _fits_plainly(job: JobSpec, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the plain engine can hold the weights: within hardware.memory_gib, or within the memory
    free on the device now (with a tenth left for the KV cache and temporaries)."""
    need = weight_bytes(model_config(job), dtype)
    if job.hardware.memory_gib is not None:
        return need <= gib_to_bytes(job.hardware.memory_gib)
    return need <= 0.9 * available_memory(device)
