from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner.job import (
    BatchSpec, DatasetFormat, DatasetSpec, Device, DType, Engine, GenerationSpec, JobError, JobSpec,
    apply_overrides, job_from_dict, load_job, parse_override, set_dotted,
)

FULL_JOB = """\
name: smoke-test_1.0
engine: hf
model:
  name: smollm2-135m
  path: auto
  dtype: bf16
hardware:
  device: cpu
  num_threads: 2
batch:
  gpu_batch_size: 4
  num_gpu_batches: 2
generation:
  max_new_tokens: 32
  do_sample: true
  temperature: 0.7
  top_p: 0.9
  top_k: 50
  seed: 1234
  stop: ["\\n\\n", "###"]
  ignore_eos: false
dataset:
  path: jobs/data/prompts.jsonl
  field: prompt
  id_field: id
  limit: 8
  template: "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
kv:
  policy: dense
output:
  dir: results/smoke
  csv: results/all.csv
"""


def minimal(**sections) -> dict:
    d = {"name": "t", "model": {"name": "opt-125m"}, "dataset": {"path": "p.jsonl"}}
    d.update(sections)
    return d


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_full_job_parses_and_round_trips(tmp_path):
    job = load_job(write(tmp_path, FULL_JOB))
    assert job.name == "smoke-test_1.0"
    assert job.engine is Engine.HF
    assert job.model.dtype is DType.BFLOAT16
    assert job.hardware.device is Device.CPU and job.hardware.num_threads == 2
    assert job.batch == BatchSpec(gpu_batch_size=4, num_gpu_batches=2)
    assert job.generation.stop == ("\n\n", "###")
    assert job.generation.temperature == 0.7
    assert job.dataset.format is DatasetFormat.JSONL  # inferred from the suffix
    assert job.dataset.template.startswith("<|im_start|>user\n{prompt}")
    assert job.output_dir == Path("results/smoke")
    assert job.throughput_csv == Path("results/all.csv")

    d = job.to_dict()
    assert d["model"]["dtype"] == "bfloat16" and d["engine"] == "hf" and d["generation"]["stop"] == ["\n\n", "###"]
    # The saved job.yaml must read back to the same spec.
    assert job_from_dict(yaml.safe_load(yaml.safe_dump(d))) == job


def test_defaults_and_derived_output_paths():
    job = job_from_dict(minimal())
    assert job.engine is Engine.ALISA
    assert job.model.path == "auto" and job.model.dtype is DType.AUTO
    assert job.batch.gpu_batch_size == 8 and job.batch.num_gpu_batches == 1
    assert job.generation == GenerationSpec()
    assert job.generation.max_new_tokens == 64 and job.generation.ignore_eos is False
    assert job.kv.policy == "dense"
    assert job.output_dir == Path("results/t")
    assert job.throughput_csv == Path("results/t/throughput.csv")
    assert job.sweep_points() == [({}, job)]


def test_empty_section_means_defaults():
    assert job_from_dict(minimal(batch=None)).batch == BatchSpec()


def test_unknown_key_names_dotted_path_and_known_keys():
    with pytest.raises(JobError) as e:
        job_from_dict(minimal(generation={"temprature": 0.5}))
    assert str(e.value).startswith("generation.temprature: unknown key (known: max_new_tokens, do_sample")
    assert e.value.key == "generation.temprature"
    with pytest.raises(JobError, match=r"^colour: unknown key \(known: name, engine, model"):
        job_from_dict(minimal(colour="red"))


@pytest.mark.parametrize("sections, key, detail", [
    ({"batch": {"gpu_batch_size": 0}}, "batch.gpu_batch_size", "must be an integer >= 1, got 0"),
    ({"generation": {"top_p": 1.5}}, "generation.top_p", "must be in (0, 1], got 1.5"),
    ({"generation": {"temperature": 0}}, "generation.temperature", "must be > 0"),
    ({"model": {"name": "opt-125m", "dtype": "fp64"}}, "model.dtype", "got 'fp64'"),
    ({"generation": {"do_sample": 1}}, "generation.do_sample", "must be true or false, got 1"),
    ({"generation": {"max_new_tokens": 2.5}}, "generation.max_new_tokens", "must be an integer"),
    ({"generation": {"stop": ["ok", ""]}}, "generation.stop[1]", "non-empty string"),
    ({"hardware": {"device": "tpu"}}, "hardware.device", "must be one of auto, cpu, cuda"),
    ({"model": {"path": "dummy"}}, "model.name", "required when model.path is 'dummy'"),
    ({"model": {"name": "x", "weight_bits": 4}}, "model.weight_bits", "must be 8 (int8 linear weights) or unset, got 4"),
    ({"model": {"name": "x", "weight_bits": 16}}, "model.weight_bits", "must be 8"),
    ({"model": {"name": "x", "weight_bits": "eight"}}, "model.weight_bits", "must be an integer"),
    ({"model": {"name": "x", "weight_bits": 8}, "engine": "hf"}, "model.weight_bits", "alisa engine without offload"),
    ({"model": {"name": "x", "weight_bits": 8}, "offload": {}}, "model.weight_bits", "alisa engine without offload"),
    ({"dataset": {"path": "p.xlsx"}}, "dataset.format", "cannot infer"),
    ({"dataset": {"path": "p.jsonl", "template": "no placeholder"}}, "dataset.template", "at least one field"),
    ({"dataset": {"path": "a.txt", "format": "synthetic", "num_prompts": 8}}, "dataset.prompt_len", "required"),
    ({"dataset": {"path": "p.jsonl", "prompt_len": 8}}, "dataset.prompt_len", "only allowed"),
    ({"dataset": {}}, "dataset.path", "required"),
    ({"name": "my job"}, "name", "letters, digits"),
    ({"batch": [1, 2]}, "batch", "must be a mapping"),
    # non-finite floats pass every `<` check, so they are refused by type, in every section
    ({"generation": {"temperature": float("nan")}}, "generation.temperature", "must be a finite number, got nan"),
    ({"hardware": {"memory_gib": float("nan")}}, "hardware.memory_gib", "must be a finite number, got nan"),
    ({"hardware": {"memory_gib": float("inf")}}, "hardware.memory_gib", "must be a finite number, got inf"),
    ({"kv": {"policy": "swa", "sparsity": float("-inf")}}, "kv.sparsity", "finite"),
    ({"hardware": {"memory_gib": 10 ** 400}}, "hardware.memory_gib", "finite"),
    # integers: 64 bits at most everywhere, and a sane bound where a typo of zeros would cost hours
    ({"batch": {"gpu_batch_size": 10 ** 30}}, "batch.gpu_batch_size", "must fit in a 64-bit integer"),
    ({"generation": {"seed": 10 ** 20}}, "generation.seed", "must fit in a 64-bit integer"),
    ({"batch": {"gpu_batch_size": 10 ** 9}}, "batch.gpu_batch_size", "must be an integer <= 1048576"),
    ({"generation": {"max_new_tokens": 10 ** 9}}, "generation.max_new_tokens", "must be an integer <= 16777216"),
])
def test_bad_values_name_the_key(sections, key, detail):
    with pytest.raises(JobError) as e:
        job_from_dict(minimal(**sections))
    assert str(e.value).startswith(f"{key}: ")
    assert detail in str(e.value)
    assert e.value.key == key


def test_weight_bits_8_is_accepted_and_unset_by_default():
    assert job_from_dict(minimal()).model.weight_bits is None
    job = job_from_dict(minimal(model={"name": "x", "weight_bits": 8}))
    assert job.model.weight_bits == 8 and job.to_dict()["model"]["weight_bits"] == 8


def test_missing_required_section():
    with pytest.raises(JobError, match=r"^dataset: required$"):
        job_from_dict({"name": "t", "model": {"name": "opt-125m"}})


def test_int_accepted_for_float_and_dtype_aliases():
    job = job_from_dict(minimal(generation={"temperature": 1, "top_p": 1}, model={"name": "x", "dtype": "fp16"}))
    assert job.generation.temperature == 1.0 and isinstance(job.generation.temperature, float)
    assert job.model.dtype is DType.FLOAT16


def test_direct_construction_is_validated_too():
    with pytest.raises(JobError, match=r"^batch.num_gpu_batches: must be an integer >= 1, got 0"):
        BatchSpec(num_gpu_batches=0)
    spec = DatasetSpec(path=Path("x.csv"), limit=3)
    assert spec.path == "x.csv" and spec.format is DatasetFormat.CSV


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: t\nmodel:\n  name: opt-125m\n  dtype: [fp16\ndataset:\n  path: p.jsonl\n")
    with pytest.raises(JobError) as e:
        load_job(path)
    message = str(e.value)
    assert message.startswith(f"{path}:5: invalid YAML")
    assert "\n" not in message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {name: opt-125m}\ndataset: {path: p.jsonl}\nname: u\n")
    with pytest.raises(JobError, match=r":4: invalid YAML \(duplicate key 'name'\)"):
        load_job(path)


def test_missing_and_empty_job_files(tmp_path):
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(JobError, match="file is empty"):
        load_job(write(tmp_path, ""))


def test_validation_errors_from_a_file_are_prefixed_with_it(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {name: opt-125m}\ndataset: {path: p.jsonl}\nbatch: {gpu_batch_size: 0}\n")
    with pytest.raises(JobError, match=rf"^{path}: batch.gpu_batch_size: must be an integer >= 1, got 0$"):
        load_job(path)


def test_overrides_parse_yaml_types(tmp_path):
    path = write(tmp_path, FULL_JOB)
    job = load_job(path, ["batch.gpu_batch_size=16", "generation.do_sample=false", "generation.stop=[a, b]",
                          "name=other", "engine=alisa", "dataset.limit=", "generation.temperature=0.25",
                          "dataset.template={prompt} Answer:"])
    assert job.batch.gpu_batch_size == 16
    assert job.generation.do_sample is False
    assert job.generation.stop == ("a", "b")
    assert job.name == "other" and job.engine is Engine.ALISA
    assert job.dataset.limit is None
    assert job.generation.temperature == 0.25
    assert job.dataset.template == "{prompt} Answer:"  # not valid YAML, kept as text


def test_override_creates_missing_section():
    d = apply_overrides(minimal(), {"hardware.num_threads": 3})
    assert job_from_dict(d).hardware.num_threads == 3
    assert "hardware" not in minimal()  # the input dict is not modified


@pytest.mark.parametrize("item, match", [
    ("batch.gpu_batch_sz=4", r"override 'batch.gpu_batch_sz=4': batch.gpu_batch_sz: unknown key \(known: gpu_batch_size"),
    ("gpu.batch=4", r"gpu.batch: unknown key \(known: name, engine"),
    ("batch.gpu_batch_size", r"expected KEY=VALUE"),
    ("name.first=x", r"name.first: 'name' is not a section"),
])
def test_bad_override_keys(tmp_path, item, match):
    with pytest.raises(JobError, match=match):
        load_job(write(tmp_path, FULL_JOB), [item])


def test_override_value_is_validated(tmp_path):
    with pytest.raises(JobError, match=r"batch.gpu_batch_size: must be an integer, got 'eight'"):
        load_job(write(tmp_path, FULL_JOB), ["batch.gpu_batch_size=eight"])


def test_parse_override_and_set_dotted():
    assert parse_override("generation.seed= 7") == ("generation.seed", 7)
    d: dict = {"batch": None}
    set_dotted(d, "batch.gpu_batch_size", 2)
    assert d == {"batch": {"gpu_batch_size": 2}}
    with pytest.raises(JobError, match=r"^kv.polcy: unknown key \(known: policy, sparsity, budget_tokens, mode, "
                                      r"score, window, sinks, per_head, bits, group_size, quant_axis, profile, "
                                      r"max_ppl_increase, accuracy_grid\)$"):
        set_dotted(d, "kv.polcy", "dense")


def test_a_sweep_of_too_many_points_is_refused_before_they_are_built():
    sweep = {"generation.seed": list(range(100)), "generation.top_k": list(range(101))}
    with pytest.raises(JobError, match=r"^sweep: 10,100 points .* more than 10,000$"):
        job_from_dict(minimal(sweep=sweep))


def test_sweep_points_cartesian_order():
    job = job_from_dict(minimal(sweep={"engine": ["hf", "alisa"], "batch.gpu_batch_size": [1, 8, 32]}))
    points = job.sweep_points()
    assert [p for p, _ in points] == [
        {"engine": e, "batch.gpu_batch_size": b} for e in ("hf", "alisa") for b in (1, 8, 32)]
    for point, spec in points:
        assert spec.engine.value == point["engine"]
        assert spec.batch.gpu_batch_size == point["batch.gpu_batch_size"]
        assert spec.sweep == () and spec.name == "t"
    assert job_from_dict(job.to_dict()) == job


def test_sweep_of_list_values_stays_hashable():
    job = job_from_dict(minimal(sweep={"generation.stop": [["\n"], ["###", "END"]]}))
    assert hash(job)
    assert [s.generation.stop for _, s in job.sweep_points()] == [("\n",), ("###", "END")]


@pytest.mark.parametrize("sweep, match", [
    ({"batch.gpu_batch_siz": [1]}, r"^sweep: batch.gpu_batch_siz: unknown key"),
    ({"batch.gpu_batch_size": []}, r"^sweep.batch.gpu_batch_size: must be a non-empty list"),
    ({"batch.gpu_batch_size": 4}, r"^sweep.batch.gpu_batch_size: must be a non-empty list"),
    ({"batch.gpu_batch_size": [4, 0]}, r"sweep point \{'batch.gpu_batch_size': 0\}: batch.gpu_batch_size: must be"),
])
def test_bad_sweeps(sweep, match):
    with pytest.raises(JobError, match=match):
        job_from_dict(minimal(sweep=sweep))


def test_synthetic_dataset_spec():
    job = job_from_dict(minimal(dataset={"path": "book.txt", "format": "synthetic", "prompt_len": 128,
                                         "num_prompts": 4}))
    assert job.dataset.format is DatasetFormat.SYNTHETIC
    assert (job.dataset.prompt_len, job.dataset.num_prompts) == (128, 4)
    assert isinstance(job, JobSpec)


# ---------------------------------------------------------------- offload section and tier budgets

def test_offload_section_parses_round_trips_and_defaults_to_absent(tmp_path):
    from runner.offload.policy import OffloadPolicy
    assert job_from_dict(minimal()).offload is None
    job = job_from_dict(minimal(hardware={"gpu_gib": 1, "cpu_gib": 2.5, "offload_dir": str(tmp_path)},
                                offload={"w_gpu_percent": 30, "w_cpu_percent": 50, "overlap": False}))
    assert job.offload == OffloadPolicy(w_gpu_percent=30.0, w_cpu_percent=50.0, overlap=False)
    assert job.offload.w_disk_percent == 20.0
    assert job.hardware.gpu_gib == 1.0 and job.hardware.disk_gib is None and job.hardware.offload_dir == str(tmp_path)
    assert job_from_dict(yaml.safe_load(yaml.safe_dump(job.to_dict()))) == job
    assert job_from_dict(minimal(offload=None)).offload is None  # an empty YAML section is no offload
    assert load_job(write(tmp_path, "name: t\nmodel: {name: x}\ndataset: {path: p.jsonl}\noffload: {}\n")).offload \
        == OffloadPolicy()


@pytest.mark.parametrize("sections, key, detail", [
    ({"offload": {"w_gpu_percnt": 10}}, "offload.w_gpu_percnt", "unknown key (known: w_gpu_percent"),
    ({"offload": {"cache_disk_percent": 20}}, "offload.cache_disk_percent",
     "not a key: the KV's disk share is the rest, 100 - cache_gpu_percent - cache_cpu_percent"),
    ({"offload": {"w_gpu_percent": 101}}, "offload.w_gpu_percent", "must be in [0, 100]"),
    ({"offload": {"w_gpu_percent": 70, "w_cpu_percent": 40}}, "offload.w_cpu_percent", "must be <= 100"),
    ({"offload": {"kv_placement": "token", "p1": 64}}, "offload.p2", "needs a phase switch length"),
    ({"offload": {"kv_placement": "rows"}}, "offload.kv_placement", "sequence"),
    ({"offload": {"act_cpu_percent": 30, "act_gpu_percent": 70}}, "offload.act_gpu_percent", "live on one tier"),
    ({"offload": {"cpu_cache_compute": True, "kv_placement": "token", "p1": 8, "p2": 8}},
     "offload.cpu_cache_compute", "for kv_placement: sequence"),
    ({"offload": {"compress_cache": True, "kv_placement": "token", "p1": 8, "p2": 8}}, "offload.compress_cache",
     "for kv_placement: sequence"),
    ({"offload": {"overlap": "yes"}}, "offload.overlap", "must be true or false"),
    ({"hardware": {"gpu_gib": -1}, "offload": {}}, "hardware.gpu_gib", "must be >= 0"),
    ({"hardware": {"cpu_gib": 4}}, "hardware.cpu_gib", "only used with an offload section"),
    ({"engine": "hf", "offload": {}}, "offload", "runs the alisa engine"),
    ({"hardware": {"memory_gib": 4}, "offload": {}}, "hardware.memory_gib", "not used with an offload section"),
    ({"hardware": {"gpu_gb": 1}, "offload": {}}, "hardware.gpu_gb", "renamed hardware.gpu_gib (GiB, 2**30 bytes)"),
    ({"hardware": {"memory_gb": 4}}, "hardware.memory_gb", "renamed hardware.memory_gib (GiB, 2**30 bytes)"),
])
def test_bad_offload_values_name_the_key(sections, key, detail):
    with pytest.raises(JobError) as e:
        job_from_dict(minimal(**sections))
    assert str(e.value).startswith(f"{key}: ") and detail in str(e.value) and "\n" not in str(e.value)
    assert e.value.key == key


def test_offload_keys_can_be_overridden_and_swept(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {name: x}\ndataset: {path: p.jsonl}\n")
    job = load_job(path, ["offload.w_cpu_percent=100", "offload.w_gpu_percent=0", "hardware.disk_gib=0.5"])
    assert job.offload.w_cpu_percent == 100.0 and job.hardware.disk_gib == 0.5
    with pytest.raises(JobError, match=r"hardware.disk_gb: renamed hardware.disk_gib \(GiB, 2\*\*30 bytes\)$"):
        load_job(path, ["hardware.disk_gb=0.5"])
    swept = job_from_dict(minimal(offload={}, sweep={"offload.overlap": [True, False]}))
    assert [p.offload.overlap for _, p in swept.sweep_points()] == [True, False]
    with pytest.raises(JobError, match=r"offload.w_gpu: unknown key"):
        load_job(path, ["offload.w_gpu=1"])
    with pytest.raises(JobError, match=r"'offload.cache_disk_percent=10': offload.cache_disk_percent: not a key"):
        load_job(path, ["offload.cache_disk_percent=10"])


def test_offload_section_can_be_swept_on_and_off():
    # One run puts the plain path beside the executor: a sweep point may drop or replace the section.
    job = job_from_dict(minimal(sweep={"offload": [None, {"w_gpu_percent": 100, "overlap": False}]}))
    (_, plain), (_, offload) = job.sweep_points()
    assert plain.offload is None and offload.offload.w_gpu_percent == 100.0 and not offload.offload.overlap
    with pytest.raises(JobError, match=r"offload.w_gpu: unknown key"):
        job_from_dict(minimal(sweep={"offload": [None, {"w_gpu": 100}]}))


def test_sweep_cases_set_several_keys_per_point():
    job = job_from_dict({**minimal(), "offload": {}, "sweep": {"cases": [
        {"kv": {"policy": "dense"}, "offload.cache_gpu_percent": 50},
        {"kv": {"policy": "swa", "sparsity": 0.8, "bits": 8},
         "offload": {"kv_placement": "token", "p1": 64, "p2": 128, "offload_ratio": 0.5}}]}})
    (p1, j1), (p2, j2) = job.sweep_points()
    assert p1 == {"kv": {"policy": "dense"}, "offload.cache_gpu_percent": 50}
    assert j1.offload.cache_gpu_percent == 50 and j1.kv.policy == "dense"
    assert j2.offload.p2 == 128 and j2.kv.bits == 8 and j2.offload.cache_gpu_percent == 100
    with pytest.raises(JobError, match=r"^sweep: sweep\.cases\[1\]: must be a non-empty mapping"):
        job_from_dict({**minimal(), "sweep": {"cases": [{"kv.bits": 8}, 3]}})
    with pytest.raises(JobError, match=r"offload\.p2"):  # a bad case fails at load time, naming the key
        job_from_dict({**minimal(), "offload": {}, "sweep": {"cases": [
            {"offload": {"kv_placement": "token", "p1": 64}}]}})


def test_dtype_maps_to_torch_as_runs_and_plans_resolve_it():
    import torch
    assert DType.AUTO.torch_dtype(accelerator=True) is torch.float16
    assert DType.AUTO.torch_dtype(accelerator=False) is torch.float32
    assert DType.AUTO.torch_dtype(accelerator=False, native_bf16=True) is torch.bfloat16  # AVX512-BF16, AMX
    assert DType.AUTO.torch_dtype(accelerator=True, native_bf16=True) is torch.float16
    assert DType("bf16").torch_dtype(accelerator=False) is torch.bfloat16
    assert {d.torch_dtype(True) for d in DType if d is not DType.AUTO} == {torch.float32, torch.float16, torch.bfloat16}
