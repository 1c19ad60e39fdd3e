"""Load job files: YAML -> `--set` overrides -> typed `JobSpec`, with every problem reported at once.

Each problem is one line naming the file, the key path and, for unknown keys, the nearest valid key:
``jobs/x.yaml: lora.rnak: unknown key (did you mean lora.rank?)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from fjordtune.config.schema import JobSpec
from fjordtune.errors import ConfigError


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`section.key=value` -> (("section", "key"), value); the value is parsed as YAML so lists work."""
    key, sep, raw = text.partition("=")
    path = tuple(p for p in key.strip().split(".") if p)
    if not sep or not path:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({_one_line(e)})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `section.key=value` override applied."""
    out = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate one job file; raise `ConfigError` listing every problem."""
    return validate_raw(read_yaml(path), source=str(path), overrides=overrides)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def validate_raw(raw: Mapping[str, Any], *, source: str, overrides: Sequence[str] = ()) -> JobSpec:
    """Validate an already-parsed job dict (e.g. received by a Ray worker) into a `JobSpec`."""
    data = apply_overrides(dict(raw), overrides)
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(*format_errors(e, source=source, overridden=overridden)) from None


def format_errors(err: ValidationError, *, source: str, overridden: set[str] = frozenset()) -> list[str]:
    lines = []
    for item in err.errors():
        loc = [str(x) for x in item["loc"] if not str(x).startswith("function-")]
        # pydantic puts the failing union arm or a "[key]" tag into loc for some types: keep only real keys
        loc = [x for x in loc if x not in _TYPE_TAGS]
        key = ".".join(loc) if loc else "(top level)"
        where = f"{source}: {key}"
        if key in overridden or any(key.startswith(o + ".") for o in overridden):
            where += " (from --set)"
        kind = item["type"]
        if kind == "extra_forbidden":
            hint = nearest_key(loc)
            lines.append(f"{where}: unknown key" + (f" (did you mean {hint}?)" if hint else ""))
        elif kind == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {_short(item.get('input'))})")
    return sorted(set(lines), key=lines.index)


def nearest_key(loc: Sequence[str]) -> str | None:
    """The valid key path closest to an unknown one, or None."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = _model_of(field.annotation) if field else None
        if sub is None:
            return None
        model = sub
    names = list(model.model_fields)
    prefix = ".".join(loc[:-1])
    if len(loc) <= 2:  # the exact key in another section beats a near spelling in this one
        for sec_name, field in JobSpec.model_fields.items():
            sub = _model_of(field.annotation)
            if sub is not None and loc[-1] in sub.model_fields and (len(loc) == 1 or sec_name != loc[0]):
                return f"{sec_name}.{loc[-1]}"
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.5)
    if not close and len(loc) <= 2:
        # a key placed in the wrong section: look for it (or a near spelling) in the other sections
        others = {}
        for sec_name, field in JobSpec.model_fields.items():
            sub = _model_of(field.annotation)
            for key in sub.model_fields if sub is not None and (len(loc) == 1 or sec_name != loc[0]) else ():
                others.setdefault(key, f"{sec_name}.{key}")
        near = difflib.get_close_matches(loc[-1], list(others), n=1, cutoff=0.75)
        return others[near[0]] if near else None
    if not close:
        return None
    return f"{prefix}.{close[0]}" if prefix else close[0]


def dump_job(job: JobSpec) -> dict[str, Any]:
    """The plain dict form of a validated job (what a Ray worker receives)."""
    return job.model_dump(mode="json")


_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "none", "literal['float32','bfloat16']"}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj
