"""Job spec: one YAML file describing a batch-generation run, parsed into frozen dataclasses.

A job has a `name`, an `engine` and sections (`model`, `hardware`, `batch`, `generation`,
`dataset`, `kv`, `output`, `sweep`, an optional `offload`: the block executor's policy, or `eval`
instead of `dataset`: an accuracy grid, `runner.eval.spec`). Every section is a frozen keyword-only
dataclass whose `__post_init__` coerces each field to its annotated type and then checks its values,
so a spec built in code is validated exactly like one read from YAML. Every error is a `JobError`
whose one-line message starts with the dotted key, e.g. `batch.gpu_batch_size: must be an integer
>= 1, got 0`.

Relative paths in a job (`model.path`, `dataset.path`, `output.dir`, `output.csv`,
`hardware.offload_dir`) are kept as written, so they resolve against the current working directory
of the process, not against the YAML file's directory: run jobs from the repository root.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import math
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from runner.cluster_spec import ClusterSpec, cluster_section
from runner.data.spec import DatasetFormat, DatasetSpec  # noqa: F401 (re-exported)
from runner.eval.spec import EvalSpec
from runner.hardware_spec import Device, HardwareSpec, LinkSpec  # noqa: F401 (re-exported)
from runner.kv.spec import KVSpec
from runner.offload.policy import OffloadPolicy
from runner.spec import (JobError, _at_least, _at_most, _bad, _build, _check_key, _freeze, _hints, _plain, _Spec,  # noqa: F401
                         _yaml_error, load_yaml, parse_override)


class Engine(str, enum.Enum):
    ALISA = "alisa"
    HF = "hf"


class DType(str, enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        return _DTYPE_ALIASES.get(value) if isinstance(value, str) else None

    def torch_dtype(self, accelerator: bool, *, native_bf16: bool = False) -> torch.dtype:
        """The compute dtype a run (and the planner's prediction of it) uses. auto: fp16 on an accelerator;
        on a CPU bf16 where it has native bf16 dot products (`native_bf16`: AVX512-BF16 or AMX, where
        oneDNN multiplies bf16 with fp32 accumulation natively and the native norm and decode kernels
        compute in fp32), else fp32: without them oneDNN emulates bf16, far slower than fp32. On SmolLM2
        bf16 costs +0.014% perplexity over fp32 (results/eval/smollm2-dtype-ppl/accuracy.csv) and halves
        the bytes to hold, to read per decode step and to stream from disk."""
        if self is DType.AUTO:
            if accelerator:
                return torch.float16
            return torch.bfloat16 if native_bf16 else torch.float32
        return {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}[self]


_DTYPE_ALIASES = {"fp32": DType.FLOAT32, "fp16": DType.FLOAT16, "bf16": DType.BFLOAT16}


class OutputOrder(str, enum.Enum):
    DATASET = "dataset"  # generations.jsonl in dataset order (with dataset.bucket: reordered at the end)
    COMPLETION = "completion"  # as batches finish (with dataset.bucket: by length within each window)


# Upper bounds no real job reaches: a typo of a few zeros is an error naming the key, not hours of
# work that fails late (or an allocation that takes the machine down).
MAX_NEW_TOKENS = 1 << 24  # 16.7M tokens: beyond the context of any model
MAX_BATCH = 1 << 20  # sequences per forward pass, GPU batches per block
MAX_SWEEP_POINTS = 10_000  # each point is a run of its own

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


# ---------------------------------------------------------------- sections

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec(_Spec):
    _section = "model"
    name: str | None = None  # preset name (e.g. smollm2-135m); checked by the model loader
    path: str = "auto"  # "auto" | "dummy" | a checkpoint directory | a .gguf file
    dtype: DType = DType.AUTO
    # 8: the layers' linear weights held as int8 (per-output-channel, runner/model/int8.py); the embedding,
    # norms and head stay in `dtype`. Unset: every weight in `dtype`.
    weight_bits: int | None = None

    def _validate(self) -> None:
        if self.path in ("auto", "dummy") and self.name is None:
            raise _bad("model.name", f"required when model.path is {self.path!r}")
        if self.weight_bits not in (None, 8):
            raise _bad("model.weight_bits", f"must be 8 (int8 linear weights) or unset, got {self.weight_bits}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSpec(_Spec):
    _section = "batch"
    gpu_batch_size: int = 8
    num_gpu_batches: int = 1

    def _validate(self) -> None:
        _at_least(self, "gpu_batch_size", 1)
        _at_least(self, "num_gpu_batches", 1)
        _at_most(self, "gpu_batch_size", MAX_BATCH)
        _at_most(self, "num_gpu_batches", MAX_BATCH)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationSpec(_Spec):
    _section = "generation"
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate exactly max_new_tokens

    def _validate(self) -> None:
        _at_least(self, "max_new_tokens", 1)
        # Past any model's context; the run checks the model's own context once it is known (run_job).
        _at_most(self, "max_new_tokens", MAX_NEW_TOKENS)
        _at_least(self, "top_k", 0)
        if self.temperature <= 0:
            raise _bad("generation.temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise _bad("generation.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputSpec(_Spec):
    _section = "output"
    dir: str | None = None  # default results/<job name>/ (see JobSpec.output_dir)
    csv: str | None = None  # default <dir>/throughput.csv (see JobSpec.throughput_csv)
    # true: a run keeps state.json and fsyncs every batch; re-running the job into the same dir resumes
    # (runner/resume.py). false: every run starts over (benchmarks that re-measure into one dir).
    resume: bool = True
    order: OutputOrder = OutputOrder.DATASET  # generations.jsonl in dataset order, or as batches finish; see OutputOrder


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec(_Spec):
    name: str  # becomes a directory name, hence the restricted alphabet
    engine: Engine = Engine.ALISA
    model: ModelSpec
    hardware: HardwareSpec = dataclasses.field(default_factory=HardwareSpec)
    batch: BatchSpec = dataclasses.field(default_factory=BatchSpec)
    generation: GenerationSpec = dataclasses.field(default_factory=GenerationSpec)
    dataset: DatasetSpec | None = None  # required unless the job has an `eval` section
    kv: KVSpec = dataclasses.field(default_factory=KVSpec)
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    sweep: tuple[tuple[str, tuple], ...] = ()  # (dotted key, values) pairs; YAML: a mapping
    eval: EvalSpec | None = None  # accuracy grid instead of generation (runner/eval/)
    offload: OffloadPolicy | None = None  # generate through the block executor (runner/offload/executor.py); or "auto"
    cluster: ClusterSpec = dataclasses.field(default_factory=ClusterSpec)  # this process, or Ray (runner/cluster.py)
    auto_offload: typing.ClassVar[bool]  # per instance, set from `offload: auto` (see __post_init__)
    auto_batch: typing.ClassVar[bool]  # per instance, set from `batch: auto`

    def __post_init__(self) -> None:
        if isinstance(self.sweep, Mapping):
            object.__setattr__(self, "sweep", _sweep_pairs(self.sweep))
        object.__setattr__(self, "cluster", cluster_section(self.cluster))  # `cluster: ray` shorthand
        # `offload: auto`: the plan search (runner.planner) picks the batch shape and the offload policy
        # on `hardware.profile` before the run; the section stays empty until then.
        auto = isinstance(self.offload, str) and self.offload == "auto"
        object.__setattr__(self, "auto_offload", auto)
        if auto:
            object.__setattr__(self, "offload", OffloadPolicy())
        # `batch: auto` (with offload: auto): the search picks gpu_batch_size and num_gpu_batches too.
        auto_batch = isinstance(self.batch, str) and self.batch == "auto"
        object.__setattr__(self, "auto_batch", auto_batch)
        if auto_batch:
            object.__setattr__(self, "batch", BatchSpec())
        super().__post_init__()

    def _validate(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or self.name in (".", ".."):
            raise _bad("name", f"must use only letters, digits and . _ - (it names a directory), got {self.name!r}")
        if self.eval is None and self.dataset is None:
            raise _bad("dataset", "required")
        if self.eval is not None:
            self._check_eval()
        self._check_offload()
        if self.model.weight_bits is not None and (self.engine is not Engine.ALISA or self.offload is not None):
            raise _bad("model.weight_bits", "int8 weights run on the alisa engine without offload (the block "
                       "executor moves float weights)")
        if self.auto_batch and not self.auto_offload:
            raise _bad("batch", "auto: the plan search picks the batch shape with offload: auto")
        points = math.prod(len(values) for _, values in self.sweep)
        if points > MAX_SWEEP_POINTS:  # checked before the points are built, each a whole job
            raise _bad("sweep", f"{points:,} points (the product of its lists' lengths), more than {MAX_SWEEP_POINTS:,}")
        for key, values in self.sweep:
            if not values:
                raise _bad(f"sweep.{key}", "must be a non-empty list of values")
            try:
                if key == "sweep":
                    raise _bad("sweep", "cannot be swept")
                for inner in _case_keys(key, values):
                    set_dotted({}, inner, None)
            except JobError as e:
                raise JobError(f"sweep: {e}", key=f"sweep.{key}") from None
        self.sweep_points()  # builds every point, so a bad combination fails at load time

    def _check_eval(self) -> None:
        """An eval job measures quality over its own kv grid; sections it would ignore are errors."""
        if self.engine is not Engine.ALISA:
            raise _bad("engine", "an eval job runs the alisa engine (the kv policies are ours)")
        if self.kv != KVSpec():
            raise _bad("kv", "not used by an eval job; list policies in eval.policies / eval.extra")
        if self.dataset is not None:
            raise _bad("dataset", "not used by an eval job; its files are eval.data")
        if self.sweep:
            raise _bad("sweep", "not supported with eval (eval.policies x sparsities x bits is the grid)")
        if self.cluster.on_ray:
            raise _bad("cluster", "an eval job runs in one process; remove cluster or use backend: local")

    def _check_offload(self) -> None:
        if self.offload is None:
            for name in ("gpu_gib", "cpu_gib", "disk_gib"):
                if self.hardware.values()[name] is not None:
                    raise _bad(f"hardware.{name}", "a tier budget of the block executor: "
                               "only used with an offload section")
            if self.hardware.link is not None:
                raise _bad("hardware.link", "the block executor's host<->gpu link: only used with an offload section")
            if not self.hardware.disk_page_cache:
                raise _bad("hardware.disk_page_cache", "the block executor's disk tier: "
                           "only used with an offload section")
            return
        if self.engine is not Engine.ALISA:
            raise _bad("offload", "the block executor runs the alisa engine; remove offload or use engine: alisa")
        if self.hardware.memory_gib is not None:
            raise _bad("hardware.memory_gib", "not used with an offload section; its budgets are hardware.gpu_gib, "
                       "cpu_gib and disk_gib")
        if self.eval is not None:
            raise _bad("offload", "not used by an eval job")
        if self.auto_offload and self.hardware.profile is None:
            raise _bad("hardware.profile", "required with offload: auto (the plan search's hardware: a "
                       "shipped profile name such as t4-16g, or a YAML path)")

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir is not None else Path("results") / self.name

    @property
    def throughput_csv(self) -> Path:
        return Path(self.output.csv) if self.output.csv is not None else self.output_dir / "throughput.csv"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["sweep"] = {key: _plain(values) for key, values in self.sweep}
        if self.auto_offload:
            d["offload"] = "auto"
        if self.auto_batch:
            d["batch"] = "auto"
        return d

    def sweep_points(self) -> list[tuple[dict[str, Any], JobSpec]]:
        """Cartesian product of the sweep (first key outermost) as (point, job without sweep)."""
        if not self.sweep:
            return [({}, self)]
        base = self.to_dict()
        del base["sweep"]
        keys = [key for key, _ in self.sweep]
        points = []
        for combo in itertools.product(*(values for _, values in self.sweep)):
            point: dict[str, Any] = {}
            for key, value in zip(keys, combo):  # a `cases` entry sets several keys together
                point.update(dict(value) if key == CASES else {key: value})
            d = copy.deepcopy(base)
            for key, value in point.items():
                set_dotted(d, key, _plain(value))
            try:
                points.append((point, _build(JobSpec, d)))
            except JobError as e:
                raise JobError(f"sweep point {_plain(point)}: {e}", key=e.key) from None
        return points


# Sweep key whose values are mappings of keys set together (one point each), e.g. FlexGen's plan with
# dense KV against ALISA's with SWA INT8: `sweep: {cases: [{offload: {...}, kv: {...}}, ...]}`.
CASES = "cases"


def _case_keys(key: str, values: tuple) -> list[str]:
    """The dotted keys a sweep key sets: itself, or for `cases` every key of every case."""
    if key != CASES:
        return [key]
    keys = []
    for i, case in enumerate(values):
        if not isinstance(case, Mapping) or not case:
            raise _bad(f"sweep.cases[{i}]", f"must be a non-empty mapping of keys to values, got {case!r}")
        keys += [k for k in case if k not in keys]
    return keys


def _sweep_pairs(sweep: Mapping) -> tuple[tuple[str, tuple], ...]:
    pairs = []
    for key, values in sweep.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise _bad(f"sweep.{key}", f"must be a non-empty list of values, got {values!r}")
        pairs.append((key, _freeze(values)))
    return tuple(pairs)


# ---------------------------------------------------------------- dotted keys and overrides

def set_dotted(d: dict, dotted_key: str, value: Any) -> None:
    """Set `section.key` (or a top-level key such as `name`, or a nested one such as `hardware.link.gbps`)
    in a raw job dict, checking every name against the spec and creating missing mappings on the way."""
    parts = str(dotted_key).split(".")
    cls, target = JobSpec, d
    for depth, name in enumerate(parts):
        _check_key(cls, name, dotted_key)
        if depth == len(parts) - 1:
            target[name] = value
            return
        where = ".".join(parts[:depth + 1])
        hint = _hints(cls)[name]
        sub_cls = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # `X | None` sections
        if not dataclasses.is_dataclass(sub_cls):
            raise _bad(dotted_key, f"{where!r} is not a section")
        sub = target.get(name)
        if sub is None:
            sub = target[name] = {}
        if not isinstance(sub, dict):
            raise _bad(where, f"must be a mapping, got {sub!r}")
        cls, target = sub_cls, sub


def apply_overrides(d: dict, overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Copy of raw job dict `d` with overrides applied: `KEY=VALUE` strings, or a {dotted key: value} map."""
    out = copy.deepcopy(d)
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_dotted(out, key, value)
        return out
    for item in overrides:
        key, value = parse_override(item)
        try:
            set_dotted(out, key, value)
        except JobError as e:
            raise JobError(f"override {item!r}: {e}", key=e.key) from None
    return out


# ---------------------------------------------------------------- loading

def job_from_dict(d: dict, source: str = "<dict>") -> JobSpec:
    """Validate a raw job dict; errors are prefixed with `source` (the file name) unless it is "<dict>"."""
    try:
        return _build(JobSpec, d)
    except JobError as e:
        if source == "<dict>":
            raise
        raise JobError(f"{source}: {e}", key=e.key) from None


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML job, apply `--set` style overrides (`section.key=value`), validate."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{source}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{source}: cannot read job file ({e})") from None
    try:
        data = load_yaml(text, source)
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise JobError(f"{source}: a job must be a mapping of sections, but the file is {kind}")
    return job_from_dict(apply_overrides(data, overrides), source)
