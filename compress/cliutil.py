"""CLI flags generated from typed configs.

Contract: ``add_config_flags(parser, Config)`` adds one ``--kebab-case`` flag
per field of a pydantic model, with the field's description as help and its
default shown; ``config_from_args(Config, args)`` builds the validated config
from the parsed namespace. Library code receives the config object, never the
argparse namespace.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """int | None -> int; list[str] -> list; Literal[...] -> Literal."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, config: type[BaseModel], exclude: tuple[str, ...] = ()) -> None:
    """Add a flag for every scalar or list field of ``config`` but ``exclude`` (nested sections: ``--set``)."""
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        kind = _base_type(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            continue
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} (default: {default})"
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(_flag(name), dest=name, nargs="+", default=None, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(_flag(name), dest=name, choices=list(typing.get_args(kind)),
                                default=None, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind if kind in (int, float) else str,
                                default=None, help=help_text)


def config_from_args(config: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """The validated config: flags the user gave override the field defaults."""
    given = {k: getattr(args, k) for k in config.model_fields if getattr(args, k, None) is not None}
    return config(**given)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. calibration.samples=32), got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged
