"""Turning pydantic validation errors into ``file:line: field: message`` lines.

Used for the configuration file and for policies: every error names the file, the line
the value came from, the dotted path of the field, and what is wrong; an unknown key
suggests the closest known one.
"""
from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from virtwarden.yamldoc import Document, format_path


def explain(error: ValidationError, root: type[BaseModel], file: str, doc: Document | None,
            base: tuple = ()) -> list[str]:
    lines = []
    for item in error.errors():
        loc = _clean(tuple(item["loc"]), root)
        path = base + loc
        line = doc.line_of(path) if doc else 1
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key" + suggest(str(loc[-1]), _fields_at(root, loc[:-1]))
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            msg = f"{item['ctx'].get('discriminator', 'type')} must be one of {item['ctx'].get('expected_tags', '?')}" \
                if item.get("ctx") else msg
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{file}:{line}: {format_path(path)}: {msg}")
    return lines


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _clean(loc: tuple, root: type[BaseModel]) -> tuple:
    """Drop the union tag pydantic inserts where a value is one of several models."""
    out: list = []
    current: object = root
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            current = _union_member(current, part)
            continue
        out.append(part)
        current = _step(current, part)
        skip_tag = _is_model_union(current)
    return tuple(out)


def _is_model_union(tp: object) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and all(
        isinstance(a, type) and issubclass(a, BaseModel) for a in typing.get_args(tp))


def _union_member(tp: object, tag: object) -> object:
    for member in typing.get_args(tp):
        field = member.model_fields.get("type") or next(iter(member.model_fields.values()), None)
        if field is not None and tag in typing.get_args(field.annotation):
            return member
    return None


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found at ``loc`` (empty when not a model)."""
    current: object = root
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _step(current: object, part: object) -> object:
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        field = current.model_fields.get(str(part))
        return _unwrap(field.annotation) if field else None
    origin = typing.get_origin(current)
    if origin in (dict, list, tuple):
        args = typing.get_args(current)
        return _unwrap(args[-1] if origin is dict else args[0]) if args else None
    return None


def _unwrap(tp: object) -> object:
    """Optional[X] -> X, Annotated[X, ...] -> X; unions of models are left alone."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp
