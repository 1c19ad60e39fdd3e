"""Human-readable documentation of the job-file schema, generated from the field descriptions."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fjordtune.config.load import _model_of
from fjordtune.config.schema import JobSpec


def explain(model: type[BaseModel] = JobSpec, prefix: str = "") -> str:
    """Every key as `section.key  type  default  description`, sections in schema order."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            lines.append(f"\n[{path}]" + (f"  {sub.__doc__.strip().splitlines()[0]}" if sub.__doc__ else ""))
            lines.append(explain(sub, prefix=f"{path}."))
            continue
        if field.default_factory is not None:
            default = repr(field.default_factory())
        elif field.default is PydanticUndefined:
            default = "(required)"
        else:
            default = repr(field.default)
        kind = _type_name(field.annotation)
        lines.append(f"  {path:<36} {kind:<14} {default}\n      {field.description or ''}")
    return "\n".join(lines).lstrip("\n")


def _type_name(annotation: object) -> str:
    """`int | 'auto'` rather than `Union` or `Annotated[int, ...]`: what a user may write."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is not None:  # list[str], dict[str, int]
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
