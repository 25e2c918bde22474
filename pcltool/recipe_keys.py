"""Every recipe key with its type, default, allowed values and meaning, read from the pydantic models in
:mod:`pcltool.config` (the one place defaults and descriptions live), for ``pcltool recipe keys``."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pcltool.config import Recipe


@dataclass(frozen=True)
class RecipeKey:
    key: str  # dotted, as ``--set`` takes it
    type: str
    default: Any
    allowed: str  # "" when any value of the type is allowed
    meaning: str

    def as_dict(self) -> dict:
        return {"key": self.key, "type": self.type, "default": self.default, "allowed": self.allowed,
                "meaning": self.meaning}


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "string" if all(isinstance(a, str) for a in args) else "literal"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | none" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(annotation, getattr(annotation, "__name__",
                                                                                             str(annotation)))


def _literals(annotation) -> tuple:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(annotation) for v in _literals(a))
    return ()


def _allowed(key: str, field) -> str:
    if key == "model.backbone":
        from pcltool.models.registry import available_backbones

        return ", ".join(available_backbones())
    literals = _literals(field.annotation)
    if literals:
        return ", ".join(str(v) for v in literals)
    bounds = []
    for m in field.metadata:
        if isinstance(m, Gt):
            bounds.append(f"> {m.gt:g}")
        elif isinstance(m, Ge):
            bounds.append(f">= {m.ge:g}")
        elif isinstance(m, Lt):
            bounds.append(f"< {m.lt:g}")
        elif isinstance(m, Le):
            bounds.append(f"<= {m.le:g}")
        elif isinstance(m, (MinLen, MaxLen)):
            continue
        elif getattr(m, "pattern", None):
            bounds.append(f"matches {m.pattern}")
    return ", ".join(bounds)


def _default(field) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return None


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[RecipeKey]:
    """One :class:`RecipeKey` per leaf of the recipe, in the order the models declare them."""
    keys: list[RecipeKey] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += recipe_keys(field.annotation, f"{key}.")
            continue
        default = _default(field)
        if isinstance(default, tuple):
            default = list(default)
        keys.append(RecipeKey(key, _type_name(field.annotation), default, _allowed(key, field),
                              (field.description or "").strip()))
    return keys


def format_default(value: Any) -> str:
    """A default as it would be written in a recipe (TOML), ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(format_default(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
