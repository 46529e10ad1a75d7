"""Override values (``SBON_A__B=v``, ``--set a.b=v``) read by the type of the field they set.

A value is text until the configuration schema says otherwise: a string field (a secret, a
model name, a revision) takes the text exactly as given, so ``#s3cret`` stays a key and is
not read as a YAML comment; numbers, booleans, lists and mappings are read with YAML's
scalar rules. A secret that is present but empty or ``null`` is an error naming its source.
"""

from __future__ import annotations

import re
import types
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr

NULL_WORDS = frozenset({"null", "Null", "NULL", "~"})
_INT = re.compile(r"^[-+]?\d+$")
_FLOAT = re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


class OverrideError(ValueError):
    """An override whose value cannot be what its setting needs; the message names it."""


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type: ``int | str | None`` gives [int, str, NoneType]."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _is_model(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)


def _model_field(model: type[BaseModel], key: str) -> Any:
    """The annotation of ``model``'s field named (or aliased) ``key``; None if unknown."""
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


def _pick_model(members: list[Any], node: Any) -> type[BaseModel] | None:
    """One model of a union; a discriminated one (rewards) by the entry's ``type``."""
    models: list[type[BaseModel]] = [m for m in members if _is_model(m)]
    if len(models) == 1:
        return models[0]
    wanted = node.get("type") if isinstance(node, dict) else None
    return next((model for model in models
                 if wanted in get_args(_model_field(model, "type"))), None)


def _child(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
        return node[int(key)]
    return None


def field_type(root: type[BaseModel], tree: dict[str, Any], path: list[str]) -> Any:
    """The declared type at ``path`` below ``root`` (``Any`` where the schema does not say:
    a mapping of free keys, a reward entry whose ``type`` is not known yet)."""
    annotation: Any = root
    node: Any = tree
    for key in path:
        members = [m for m in _members(annotation) if m is not type(None)]
        model = _pick_model(members, node)
        if model is not None:
            annotation = _model_field(model, key)
        elif len(members) == 1 and get_origin(members[0]) is list:
            annotation = get_args(members[0])[0] if get_args(members[0]) else Any
        else:
            return Any
        if annotation is None:
            return Any
        node = _child(node, key)
    return annotation


def _textual(member: Any) -> bool:
    if member is str or member is SecretStr:
        return True
    if isinstance(member, type) and issubclass(member, Enum):
        return True
    return get_origin(member) is Literal and all(isinstance(a, str) for a in get_args(member))


def _strict_scalar(text: str, members: list[Any]) -> Any:
    """A number or boolean only when the text is exactly one and the field takes it."""
    stripped = text.strip()
    if int in members and _INT.match(stripped):
        return int(stripped)
    if float in members and _FLOAT.match(stripped):
        return float(stripped)
    if bool in members and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text


def typed_value(annotation: Any, text: str, source: str) -> Any:
    """The value of override ``text`` for a field of type ``annotation``.

    ``source`` names where it came from (``SBON_SERVER__API_KEY``, ``--set server.port``)
    for the error a present but empty or null secret raises.
    """
    members = _members(annotation)
    if SecretStr in members:
        if not text.strip() or text.strip() in NULL_WORDS:
            raise OverrideError(
                f"{source} is set but {'empty' if not text.strip() else 'null'}: a secret must "
                "be given as its text; leave the setting out to run without it")
        return text
    if any(_textual(m) for m in members):
        if type(None) in members and text.strip() in NULL_WORDS:
            return None
        return _strict_scalar(text, members)
    return parse_yaml_scalar(text)


def parse_yaml_scalar(text: str) -> Any:
    """Read a non-text value with YAML's scalar rules (numbers, booleans, null, lists).

    An empty value stays an empty string (YAML would read null), so that a field which
    needs a value refuses it rather than silently taking its default; and a value with a
    ``#`` stays text (YAML would cut a comment off: ``extra_args`` may hold a token).
    """
    if not text.strip() or "#" in text:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
