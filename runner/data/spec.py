"""The job's `dataset` section: where the prompts come from and how each record becomes a prompt."""
from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

from runner.spec import _at_least, _bad, _Spec


class DatasetFormat(str, enum.Enum):
    JSONL = "jsonl"
    CSV = "csv"
    TSV = "tsv"
    PARQUET = "parquet"
    TXT = "txt"
    DIR = "dir"  # a directory: its files of the formats above, by name, each read by its suffix
    SYNTHETIC = "synthetic"


class OnError(str, enum.Enum):
    SKIP = "skip"  # a bad record goes to rejects.jsonl with its line and reason; the job goes on
    FAIL = "fail"  # the job stops at the first bad record, naming its line


TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a {name} placeholder of dataset.template
_SUFFIX_FORMATS = {".jsonl": DatasetFormat.JSONL, ".csv": DatasetFormat.CSV, ".tsv": DatasetFormat.TSV,
                   ".parquet": DatasetFormat.PARQUET, ".txt": DatasetFormat.TXT}

@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec(_Spec):
    _section = "dataset"
    path: str | None = None  # prompts file; for synthetic, the source text
    format: DatasetFormat | None = None  # inferred from the path suffix when omitted; never None after init
    field: str = "prompt"  # jsonl key / csv column holding the prompt
    id_field: str = "id"  # records without it get their 1-based line (csv: data-row) number
    offset: int = 0  # skip the first N records (blank lines are not records)
    limit: int | None = None  # then keep at most N records (rejected ones count)
    # "Question: {question}\nAnswer:": {name} is the record's field `name`, {prompt} the `field` value;
    # {{ and }} are literal braces. Not applied to synthetic prompts.
    template: str | None = None
    on_error: OnError = OnError.SKIP
    # Sort each window of N consecutive records by prompt length before batching (less padding);
    # outputs stay keyed by id and, with output.order: dataset, in dataset order. 0: off.
    bucket: int = 0
    # Scale-out: this runner takes the batch windows w with w % shard_count == shard_index (set by the
    # Ray driver, runner/cluster.py; a user rarely sets them).
    shard_index: int = 0
    shard_count: int = 1
    prompt_len: int | None = None  # synthetic only: tokens per prompt
    num_prompts: int | None = None  # synthetic only; default: one block (gpu_batch_size * num_gpu_batches)

    def _validate(self) -> None:
        if self.path is None:
            raise _bad("dataset.path", "required (the prompts file, or the source text for synthetic)")
        if self.format is None and Path(self.path).is_dir():
            object.__setattr__(self, "format", DatasetFormat.DIR)
        if self.format is None:
            fmt = _SUFFIX_FORMATS.get(Path(self.path).suffix.lower())
            if fmt is None:
                raise _bad("dataset.format", f"cannot infer from {self.path!r}; set one of "
                           + ", ".join(f.value for f in DatasetFormat))
            object.__setattr__(self, "format", fmt)
        _at_least(self, "limit", 1)
        _at_least(self, "offset", 0)
        _at_least(self, "bucket", 0)
        _at_least(self, "shard_count", 1)
        if not 0 <= self.shard_index < self.shard_count:
            raise _bad("dataset.shard_index", f"must be in [0, shard_count={self.shard_count}), got {self.shard_index}")
        if self.template is not None and not TEMPLATE_FIELD.search(self.template.replace("{{", "").replace("}}", "")):
            raise _bad("dataset.template", f"must name at least one field as {{name}}, got {self.template!r}")
        synthetic = self.format is DatasetFormat.SYNTHETIC
        if synthetic and self.prompt_len is None:
            raise _bad("dataset.prompt_len", "required when dataset.format is synthetic")
        for name in ("prompt_len", "num_prompts"):
            if not synthetic and self.values()[name] is not None:
                raise _bad(f"dataset.{name}", "only allowed when dataset.format is synthetic")
            _at_least(self, name, 1)
        if synthetic and self.template is not None:
            raise _bad("dataset.template", "not applied to synthetic prompts; remove it")
        if synthetic and self.offset:
            raise _bad("dataset.offset", "not used by synthetic prompts")
