"""Generic machinery for frozen, keyword-only dataclass specs read from YAML mappings.

It knows nothing about jobs or their sections: `_Spec` coerces each field of a subclass to its
annotated type and runs the subclass's checks, `_build` turns a raw mapping into a spec while
rejecting unknown and missing keys, and every error is a `JobError` whose message starts with the
dotted key at fault. It lives apart from `runner.job` so that module holds only the job's own
sections, sweep, overrides and loading.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

import yaml


class JobError(ValueError):
    """Invalid job; `key` is the dotted key at fault when there is one."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
_FLOAT_MAX = 1.7976931348623157e308


def _shown(value: Any) -> str:
    """A value for a one-line error: a 400-digit integer is cut, not printed whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _bad(key: str, problem: str) -> JobError:
    return JobError(f"{key}: {problem}", key=key)


class _Spec:
    """Base of every section: type coercion + per-section checks, and conversion back to a dict."""

    _section = ""  # dotted prefix of this section's keys ("" for the top level)
    # Keys an older version read, each with what replaced it: naming one is an error that says so.
    _retired: typing.ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for name, value in self.values().items():
            # object.__setattr__ because the dataclasses are frozen; this runs once, at construction.
            object.__setattr__(self, name, _coerce(hints[name], value, self._key(name)))
        self._validate()

    def values(self) -> dict[str, Any]:
        """Field name -> value, in declaration order: what checks that loop over fields read."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls._section}.{name}" if cls._section else name

    def _validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict (enums as values, tuples as lists) that `job_from_dict` reads back."""
        return {name: _plain(value) for name, value in self.values().items()}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, _Spec):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    # Sweep values may be lists (e.g. a `generation.stop` list); tuples keep the spec hashable.
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _build(cls: type, data: Any) -> Any:
    """Construct section `cls` from a raw mapping, rejecting unknown and missing keys by name."""
    if not isinstance(data, Mapping):
        raise _bad(cls._section or "job", f"must be a mapping, got {type(data).__name__} {data!r}")
    fields = dataclasses.fields(cls)
    for k in data:
        _check_key(cls, k, cls._key(k))
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _bad(cls._key(f.name), "required")
    return cls(**data)


def _check_key(cls: type, name: str, key: str) -> None:
    """`name` must be a field of section `cls`; a retired key's error says what replaced it. `key`: as reported."""
    if name in cls._retired:
        raise _bad(key, cls._retired[name])
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise _bad(key, f"unknown key (known: {', '.join(names)})")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only where YAML can't express the type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used by the job sections
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, {} if value is None else value)  # an empty YAML section means defaults
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise _bad(key, f"must be one of {', '.join(m.value for m in tp)}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:  # no count, size or seed of a job needs more than 64 bits
                raise _bad(key, f"must fit in a 64-bit integer, got {_shown(value)}")
            return value
        raise _bad(key, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # NaN and inf pass every `<` check, so they are refused here, once; an int past a float's range too
            if isinstance(value, int) and abs(value) > _FLOAT_MAX or not math.isfinite(value):
                raise _bad(key, f"must be a finite number, got {_shown(value)}")
            return float(value)
        raise _bad(key, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, os.PathLike):  # let code pass Path objects for path fields
            value = os.fspath(value)
        if isinstance(value, str) and value:  # no field of a job has a use for ""; "\n" is a fine stop
            return value
        raise _bad(key, f"must be a non-empty string, got {value!r}")
    if tp is tuple or origin is tuple:
        return _coerce_tuple(args, value, key)
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a bug in this module, not in the job


def _coerce_tuple(args: tuple, value: Any, key: str) -> tuple:
    if isinstance(value, str) and args == (str, Ellipsis):
        value = [value]  # `stop: "\n"` is shorthand for a one-element list
    if not isinstance(value, (list, tuple)):
        raise _bad(key, f"must be a list, got {value!r}")
    if not args:
        return _freeze(value)
    if args[1:] == (Ellipsis,):
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _bad(key, f"must have {len(args)} items, got {len(value)}")
    return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _at_most(spec: _Spec, name: str, high: int) -> None:
    value = spec.values()[name]
    if value is not None and value > high:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise _bad(spec._key(name), f"must be {kind} <= {high}, got {value}")


def _at_least(spec: _Spec, name: str, low: int) -> None:
    value = spec.values()[name]
    if value is not None and value < low:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise _bad(spec._key(name), f"must be {kind} >= {low}, got {value}")


# ---------------------------------------------------------------- YAML text

def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, YAML-parsed value); text that isn't valid YAML stays a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise JobError(f"override {item!r}: expected KEY=VALUE, e.g. batch.gpu_batch_size=8")
    try:
        value = load_yaml(raw, f"override {item!r}")
    except yaml.YAMLError:
        value = raw  # e.g. a template such as `{prompt} Answer:` that YAML reads as a broken mapping
    return key.strip(), value


MAX_YAML_NODES = 100_000  # a job is tens of nodes, a big sweep a few thousand


def load_yaml(text: str, source: str) -> Any:
    """`text` parsed with duplicate keys refused and its size bounded: aliases repeat a node without
    copying its text, so nine lines of `&a [*b, *b, ...]` expand to a billion nodes. The node graph is
    counted as it would expand, before anything is built (JobError naming `source` past the bound)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise JobError(f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases repeat "
                           "nodes); write the job out without so many aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes of `node` with every alias expanded, stopping once past the bound (a shared node is counted
    once per use, but measured once: the graph is a DAG of at most as many nodes as the text has)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_NODES + 1  # a node that holds itself (`&a [*a]`) expands forever
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            break
    sizes[id(node)] = total
    return total


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(source: str, e: yaml.YAMLError) -> JobError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    return JobError(f"{where}: invalid YAML ({' '.join(problem.split())})")
