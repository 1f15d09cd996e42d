"""Pydantic validation errors as one line: the key path, the problem, and the nearest valid key."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from multifi.errors import MultifiError


def validate(model: type[BaseModel], raw: dict, where: str):
    """model.model_validate(raw), turning the first error (unknown keys first) into a MultifiError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise MultifiError(f"{where}: {describe(errors[0], model)}") from None


def describe(err: dict, root: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = model_at(root, err["loc"][:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(valid)})"
        return f"unknown key {loc!r}{hint}"
    if err["type"] == "missing":
        return f"missing required key {loc!r}"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg if err["type"] == "value_error" else f"{msg} (got {err.get('input')!r})"
    return f"{loc}: {msg}" if loc else msg  # a check of the whole file has no key path


def model_at(root: type[BaseModel], loc) -> type[BaseModel] | None:
    """The pydantic model that holds the key at `loc` (list indices and dict keys are stepped over)."""
    model: Any = root
    for p in loc:
        if isinstance(p, int) or model is None:
            continue
        field = model.model_fields.get(p)
        if field is None:  # a dict key (e.g. a variant name): the value type is the model
            continue
        model = first_model(field.annotation)
    return model


def first_model(ann):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()):
        m = first_model(a)
        if m is not None:
            return m
    return None
