"""Load job files: YAML -> `--set` overrides -> typed `JobSpec`, with every problem reported at once.

Each problem is one line naming the file, the key path and, for unknown keys, the nearest valid key:
``jobs/x.yaml: lora.rnak: unknown key (did you mean lora.rank?)``.

Credentials never belong in a job file: it travels with the job (uploaded working directory,
`--set` values in the entrypoint, `submit.env_vars` in Ray's runtime_env) and shows in logs and the
dashboard. A key or an environment variable named like a credential, or a `user:password@` in a URL,
is refused with a line that names the key path but never the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
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
        silent = silent_yaml(yaml.compose(raw, Loader=yaml.SafeLoader)) if raw.strip() else []
    except yaml.YAMLError as e:
        secret = _URL_USERINFO.search(raw) or any(map(_is_credential_name, [*path, *re.findall(r"[\w.-]+", raw)]))
        shown = f"{key.strip()}=..." if secret else repr(text)
        raise ConfigError(f"--set {shown}: value is not valid YAML ({_yaml_problem(e)})") from None
    if silent:
        raise ConfigError(*(f"--set {'.'.join(path)}: {why}" for _, _, why in silent))
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
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        repeated = repeated_keys(node)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    problems = [(line, f"{path}:{line}: {key}: repeated key (first at line {first}); keep one")
                for key, line, first in repeated]  # YAML keeps the last one without a word
    problems += [(line, f"{path}:{line}: {key}: {why}") for key, line, why in silent_yaml(node)]
    if problems:
        raise ConfigError(*(text for _, text in sorted(problems)))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def repeated_keys(node: Any, path: tuple[str, ...] = (), seen: set[int] | None = None) -> list[tuple[str, int, int]]:
    """(key path, line, line of its first occurrence) of every key repeated within one mapping, at any
    depth of a composed YAML document (1-based lines). A node reached again through an alias is read once."""
    out: list[tuple[str, int, int]] = []
    seen = set() if seen is None else seen
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in first:
                out.append((".".join((*path, key)), line, first[key]))
            first.setdefault(key, line)
            out += repeated_keys(value_node, (*path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += repeated_keys(item, (*path, f"[{i}]"), seen)
    return out


_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")
_OCTAL = re.compile(r"^[-+]?0[0-9_]+$")


def silent_yaml(node: Any, path: tuple[str, ...] = (), seen: set[int] | None = None) -> list[tuple[str, int, str]]:
    """(key path, line, why) of every YAML 1.1 construct that PyYAML reads differently from what it looks
    like: `yes`/`no`/`on`/`off` read as booleans (the "Norway problem": a language code `no` becomes
    false), `1:30` read as 90 (base 60), `0755` read as octal 493, and `<<` merge keys, where a key
    written beside the merge silently wins. Quoted scalars are taken as written, so quoting is the fix."""
    out: list[tuple[str, int, str]] = []
    seen = set() if seen is None else seen
    if id(node) in seen:
        return out
    seen.add(id(node))
    where = ".".join(path) or "(top level)"
    if isinstance(node, yaml.ScalarNode) and node.style is None:
        v, line = str(node.value), node.start_mark.line + 1
        if node.tag.endswith(":bool") and v.lower() not in ("true", "false"):
            out.append((where, line, f"`{v}` reads as {v.lower() in ('yes', 'on', 'y')!s}: write true/false, or "
                                     f"quote it ('{v}') for the text"))
        elif node.tag.endswith((":int", ":float")) and _SEXAGESIMAL.match(v):
            out.append((where, line, f"`{v}` reads as a base-60 number ({yaml.safe_load(v)}): quote it ('{v}')"))
        elif node.tag.endswith(":int") and _OCTAL.match(v) and v.strip("+-0_"):
            out.append((where, line, f"`{v}` reads as octal ({yaml.safe_load(v)}): drop the leading zero, or "
                                     f"quote it ('{v}')"))
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            if key_node.tag == "tag:yaml.org,2002:merge":
                out.append((where, key_node.start_mark.line + 1, "`<<` merge key: a key written beside it silently "
                            "wins over the merged one; write the keys out (anchors and aliases alone are fine)"))
                continue
            if isinstance(key_node, yaml.ScalarNode) and key_node.style is None and key_node.tag.endswith(":bool"):
                out.append((".".join((*path, key)), key_node.start_mark.line + 1,
                            f"the key `{key}` reads as a boolean: quote it ('{key}')"))
            out += silent_yaml(value_node, (*path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += silent_yaml(item, (*path, f"[{i}]"), seen)
    return out


def validate_raw(raw: Mapping[str, Any], *, source: str, overrides: Sequence[str] = ()) -> JobSpec:
    """Validate an already-parsed job dict (e.g. received by a Ray worker) into a `JobSpec`."""
    data = apply_overrides(dict(raw), overrides)
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    found = find_credentials(data)
    lines = [f"{_where(source, key, overridden)}: {message}" for key, message in found.problems.items()]
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        lines += format_errors(e, source=source, overridden=overridden, credentials=found)
    if lines:
        raise ConfigError(*lines)
    return job


def format_errors(err: ValidationError, *, source: str, overridden: set[str] = frozenset(),
                  credentials: FoundCredentials | None = None) -> list[str]:
    """One line per pydantic error. Errors at a key already refused as a credential are left out, and
    any credential value that would still show (in a `(got ...)`) is masked."""
    lines = []
    for item in err.errors():
        loc = [str(x) for x in item["loc"] if not str(x).startswith("function-")]
        # pydantic puts the failing union arm or a "[key]" tag into loc for some types: keep only real keys
        loc = [x for x in loc if x not in _TYPE_TAGS]
        key = key_path(loc) if loc else "(top level)"
        if credentials is not None and any(key == k or key.startswith(k + ".") for k in credentials.problems):
            continue
        where = _where(source, key, overridden)
        kind = item["type"]
        if kind == "extra_forbidden":
            hint = nearest_key(loc)
            lines.append(f"{where}: unknown key" + (f" (did you mean {hint}?)" if hint else ""))
        elif kind == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {_short(item.get('input'))})")
    if credentials is not None:
        lines = [credentials.mask(line) for line in lines]
    return sorted(set(lines), key=lines.index)


def _where(source: str, key: str, overridden: set[str]) -> str:
    where = f"{source}: {key}"
    if key in overridden or any(key.startswith(o + ".") for o in overridden):
        where += " (from --set)"
    return where


# -- credentials ---------------------------------------------------------------------------------------

_NOT_HERE = "credentials do not belong in a job file"
_TRAVELS = "(the job file and --set values travel with the job and show in logs and the dashboard)"
_FROM_ENV = "the cluster's environment, an AWS profile or an instance role"
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@\s]*):([^/?#@\s]+)@")
#: A part of a name (split at `_`, `-`, `.` and camelCase) that marks it as a credential.
_CREDENTIAL_PART = re.compile(
    r"\w*(secret|passw(or)?d|passphrase|credential)\w*|\w*token|\w*(api|access|private)key\w*")
_CREDENTIAL_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}


@dataclasses.dataclass
class FoundCredentials:
    """What `find_credentials` found: one message per key path, and the values (to mask)."""

    problems: dict[str, str] = dataclasses.field(default_factory=dict)
    values: set[str] = dataclasses.field(default_factory=set)

    def mask(self, line: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            if len(value) >= 4:
                line = line.replace(value, "***")
        return line


def find_credentials(data: Mapping[str, Any]) -> FoundCredentials:
    """Credentials written into a job: keys named like one (anywhere, e.g. `storage.secret_key`),
    credential environment variables in `submit.env_vars` (e.g. `AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`),
    and `user:password@` in any string (e.g. `storage.endpoint_url`, a `submit.pip` git URL)."""
    found = FoundCredentials()
    _scan(data, (), JobSpec, found)
    return found


def _scan(node: Any, loc: tuple[str, ...], model: type[BaseModel] | None, found: FoundCredentials) -> None:
    key = key_path(loc)
    if isinstance(node, Mapping):
        for name, value in node.items():
            name = str(name)
            field_info = model.model_fields.get(name) if model is not None else None
            if loc == ("submit", "env_vars"):
                if _is_credential_name(name):
                    where = "the cluster's environment" if not name.upper().startswith("AWS_") else _FROM_ENV
                    found.problems[f"{key}.{name}"] = (
                        f"{_NOT_HERE} (they would travel in Ray's runtime_env and show in the dashboard); "
                        f"set {name} in {where}")
                    found.values.update(_leaves(value))
                    continue
            elif field_info is None and _is_credential_name(name):
                found.problems[f"{key}.{name}" if key else name] = (
                    f"{_NOT_HERE} {_TRAVELS}; S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                    f"in {_FROM_ENV}")
                found.values.update(_leaves(value))
                continue
            sub = _model_of(field_info.annotation) if field_info is not None else None
            _scan(value, (*loc, name), sub, found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _scan(value, (*loc, str(i)), None, found)
    elif isinstance(node, str) and (m := _URL_USERINFO.search(node)):
        found.problems[key] = (f"{_NOT_HERE} {_TRAVELS}; remove the user:password@ from the URL and give "
                               f"credentials through {_FROM_ENV}")
        found.values.update(v for v in (m.group(1), m.group(2), node) if v)


def _is_credential_name(name: str) -> bool:
    """`AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`, `secretKey`, `db_password`: yes; `tokenizer`: no."""
    parts = [p for p in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()) if p]
    return (any(_CREDENTIAL_PART.fullmatch(p) for p in parts)
            or any(pair in _CREDENTIAL_PAIRS for pair in zip(parts, parts[1:])))


def _leaves(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [] if value is None else [str(value)]


def key_path(loc: Sequence[str]) -> str:
    """`data.sources[0].weight` from pydantic's location ("data", "sources", "0", "weight")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out


def nearest_key(loc: Sequence[str]) -> str | None:
    """The valid key path closest to an unknown one, or None."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        if part.isdigit():  # an item of a list of sections (data.sources[0]): `_model_of` looked inside the list
            continue
        field = model.model_fields.get(part)
        sub = _model_of(field.annotation) if field else None
        if sub is None:
            return None
        model = sub
    names = list(model.model_fields)
    prefix = key_path(loc[:-1])
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quoted snippet of the text (which may hold a secret)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return " ".join(f"{e.context + ': ' if e.context else ''}{e.problem}{where}".split())
    return _one_line(e)


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj
