"""Configuration layers (mode defaults, a file, the environment, arguments): the partial shape
a layer is checked against, and the merge of layers key by key down to the leaves.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, create_model

__all__ = ["deep_merge", "explicit", "partial_dump", "partial_fields", "partial_model"]


def partial_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Field definitions mirroring ``model`` with every field optional and unconstrained.

    A layer holds only part of a config, so it cannot be checked against the model itself;
    this shape still rejects unknown keys and values of the wrong type while naming the
    layer. Constraints and cross-field rules run once, on the merged result. Built from the
    model, so a field added there is picked up here without an edit.
    """
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = partial_model(annotation)
        elif get_origin(annotation) in (Union, types.UnionType):
            # ``Model | None``: a layer may set part of the nested table too.
            annotation = Union[tuple(  # noqa: UP007  (built from a runtime tuple)
                partial_model(a) if isinstance(a, type) and issubclass(a, BaseModel) else a
                for a in get_args(annotation))]
        elif get_origin(annotation) is Literal:
            # Environment values are strings and pydantic will not read "1" as Literal[1];
            # the base type converts it and the full model then checks the allowed values.
            kinds = {type(arg) for arg in get_args(annotation)}
            if len(kinds) == 1:
                annotation = kinds.pop()
        fields[name] = (annotation | None, None)
    return fields


def partial_model(model: type[BaseModel]) -> type[BaseModel]:
    """``Partial<Model>``: :func:`partial_fields` of ``model``, unknown keys forbidden."""
    return create_model(
        f"Partial{model.__name__}",
        __config__=ConfigDict(extra="forbid", hide_input_in_errors=True),
        **partial_fields(model),
    )


def partial_dump(model: BaseModel) -> dict[str, Any]:
    """The fields a partial model was given, as a nested dict."""
    # Python mode keeps SecretStr, Path and enums as objects: nothing is revealed or re-parsed.
    dumped: dict[str, Any] = model.model_dump(exclude_unset=True)
    return dumped


def deep_merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested mappings, later layers winning field by field (file < env < arguments)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = deep_merge(value)
            else:
                out[key] = value
    return out


def explicit(value: Any) -> Any:
    """A keyword override as a plain value; a model contributes only the fields it was given."""
    if isinstance(value, BaseModel):
        return {k: explicit(getattr(value, k)) for k in value.model_fields_set}
    if isinstance(value, Mapping):
        return {k: explicit(v) for k, v in value.items()}
    return value
