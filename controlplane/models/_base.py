"""The base of every API body model, and Firecracker-style deserialisation errors.

Firecracker deserialises bodies with serde (`deny_unknown_fields`, no type coercion), so
clients see messages such as "unknown field `foo`" or "missing field `vcpu_count`". The
models are strict pydantic models and `parse_body` turns pydantic's first error into the
same kind of sentence, so a client's error handling keeps working.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

DESERIALIZE_PREFIX = "An error occurred when deserializing the json body of a request: "


class FcModel(BaseModel):
    """Strict, closed model: unknown fields and type coercions are errors, as in serde.

    `defer_build`: a model's validator is built the first time it validates, not when its
    class is defined, so a start-up pays only for the models its path uses (a --no-api boot
    never builds the snapshot or balloon models; docs/performance.md)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, defer_build=True)


class BodyError(ValueError):
    """A body that does not deserialise; the message is a complete fault_message."""


def parse_body(model: type[M], raw: bytes | str) -> M:
    """Validate a raw JSON body against `model`, raising BodyError with a serde-like message."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise BodyError(DESERIALIZE_PREFIX + describe_error(model, err) + ".") from None


def parse_value(model: type[M], value: Any) -> M:
    """Validate an already-decoded JSON value (config file sections)."""
    return parse_body(model, json.dumps(value))


def describe_error(model: type[BaseModel], err: ValidationError) -> str:
    """One serde-like sentence for the first error pydantic reports."""
    errors = err.errors(include_url=False)
    # serde stops at an unknown field as it reads it, before it can miss a required one.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first.get("loc", ()))
    kind = first["type"]
    value = first.get("input")
    ctx = first.get("ctx") or {}
    where = _path(loc)
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        text = f"unknown field `{loc[-1]}`"
        if fields:
            text += ", expected one of " + ", ".join(f"`{name}`" for name in fields)
        return text + _at(loc[:-1])
    if kind == "missing":
        return f"missing field `{loc[-1]}`" + _at(loc[:-1])
    if kind == "json_invalid":
        return f"invalid JSON: {ctx.get('error', first['msg'])}"
    if kind == "literal_error":
        choices = str(ctx.get("expected", "")).replace("'", "`")
        return f"unknown variant `{value}`, expected {choices}" + _at(loc, where)
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
        limit = next(iter(ctx.values()), "")
        return f"invalid value: {_show(value)}, expected an integer {bound[kind]} {limit}" + _at(loc, where)
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", first["msg"])).removeprefix("Value error, ") + _at(loc, where)
    expected = _EXPECTED.get(kind.split("_")[0], kind.replace("_", " "))
    return f"invalid type: {_show(value)}, expected {expected}" + _at(loc, where)


_EXPECTED = {
    "int": "an integer",
    "string": "a string",
    "bool": "a boolean",
    "float": "a number",
    "list": "a sequence",
    "dict": "a map",
    "model": "a map",
    "none": "null",
}


def _show(value: Any) -> str:
    """Describe a JSON value the way serde does in its messages."""
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a sequence"
    return "a map"


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _at(loc: tuple[Any, ...], where: str | None = None) -> str:
    """Name the field a nested error is about ('at `a.b`'), as serde names the position."""
    where = _path(loc) if where is None else where
    return f" at `{where}`" if where else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) of the sub-model that `loc` points into, if it is a model."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = _field_by_name(current, str(part))
        current = field.annotation if field is not None else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _field_by_name(model: type[BaseModel], name: str) -> Any:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/list/Annotated wrappers down to the model class, if any."""
    for _ in range(4):
        origin = typing.get_origin(annotation)
        if origin is None:
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin in (typing.Union, types.UnionType, list, typing.Annotated) and args:
            annotation = args[0]
        else:
            return annotation
    return annotation
