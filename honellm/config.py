"""Typed configuration: pydantic models, YAML files, dotted `key=value` overrides, errors that say where.

Every config class derives from `Config`: unknown keys are errors that suggest the closest valid name, and every
validation error names the YAML file and line when the value came from one.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from honellm.errors import HoneError

C = TypeVar("C", bound="Config")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class Config(BaseModel):
    """Base of every Hone config: strict about unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ------------------------------------------------------------------------------------------------- YAML


class LineMap(dict):
    """Maps a dotted key path ("prompt.template", "rewards.0.name") to its line in the YAML file."""


def load_yaml(path: str | Path) -> tuple[dict, LineMap]:
    """Read a YAML mapping and the line of every key in it."""
    path = Path(path)
    if not path.exists():
        raise HoneError("file not found", where=str(path), fix="check the path")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HoneError(f"not valid YAML: {getattr(err, 'problem', err)}", where=where,
                        fix="fix the YAML syntax (indentation, quotes, colons)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HoneError("expected a mapping of keys to values at the top level", where=f"{path}:1")
    lines = LineMap()
    if node is not None:
        _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node, prefix: str, lines: LineMap) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}.{i}" if prefix else str(i)
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, key, lines)


# ------------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise HoneError(f"override {text!r} is not of the form key=value", fix="write e.g. lr=1e-4 or data.test=test.jsonl")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise HoneError(f"override {text!r} has no key", fix="write e.g. lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string; everyone means the number
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    target = data
    for part in parts[:-1]:
        if isinstance(target, list):
            target = target[int(part)]
            continue
        if not isinstance(target.get(part), (dict, list)):
            target[part] = {}
        target = target[part]
    if isinstance(target, list):
        target[int(parts[-1])] = value
    else:
        target[parts[-1]] = value


def field_names(cls: type[BaseModel]) -> list[str]:
    return list(cls.model_fields)


def nested_model(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The config class of field `name` when it is itself a config (also inside Optional)."""
    field = cls.model_fields.get(name)
    if field is None:
        return None
    annotation = field.annotation
    candidates = [annotation, *get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def check_key(cls: type[BaseModel], key: str, *, where: str | None = None) -> None:
    """Raise a helpful error when dotted `key` does not name a field of `cls` (recursing into sub-configs)."""
    current: type[BaseModel] | None = cls
    walked = []
    for part in key.split("."):
        if current is None:
            return  # inside a free-form dict or list: nothing to check
        if part not in current.model_fields:
            raise unknown_key_error(".".join([*walked, part]), field_names(current), where=where)
        walked.append(part)
        annotation = current.model_fields[part].annotation
        origin = get_origin(annotation)
        current = nested_model(current, part) if origin not in (dict, list) else None


def unknown_key_error(key: str, valid: list[str], *, where: str | None = None) -> HoneError:
    last = key.split(".")[-1]
    close = difflib.get_close_matches(last, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return HoneError(f"unknown key {key!r}", where=where, fix=f"{hint}valid keys here: {', '.join(valid)}")


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any], cls: type[BaseModel]) -> dict:
    """Apply dotted overrides to a raw config dict, rejecting keys that `cls` does not have."""
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        check_key(cls, key, where="command line")
        set_dotted(data, key, value)
    return data


# ------------------------------------------------------------------------------------------------- validation


def validate(cls: type[C], data: dict, *, source: str | os.PathLike | None = None, lines: LineMap | None = None,
             prefix: str = "") -> C:
    """Build `cls` from `data`, turning pydantic's errors into one HoneError that names file, line and key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise config_error(err, cls, source=source, lines=lines, prefix=prefix) from None


def config_error(err: ValidationError, cls: type[BaseModel], *, source=None, lines: LineMap | None = None,
                 prefix: str = "") -> HoneError:
    messages = []
    fixes = []
    for item in err.errors():
        loc = [str(x) for x in item["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc)
        line = (lines or {}).get(key)
        where = f"{source}:{line}" if source and line else (str(source) if source else "config")
        if item["type"] == "extra_forbidden":
            owner = cls
            for part in loc[:-1]:
                owner = nested_model(owner, part) or owner if not part.isdigit() else owner
            fix = unknown_key_error(key, field_names(owner)).fix
            messages.append(f"{where}: unknown key {key!r}")
            fixes.append(fix)
        else:
            messages.append(f"{where}: {key}: {item['msg']} (got {item.get('input')!r})")
            description = _field_description(cls, loc)
            if description:
                fixes.append(f"{key}: {description}")
    fix = "; ".join(f for f in fixes if f) or "see `hone <verb> --help` and the examples/ folder"
    return HoneError("invalid configuration:\n  " + "\n  ".join(messages), fix=fix)


def _field_description(cls: type[BaseModel], loc: list[str]) -> str | None:
    current: type[BaseModel] | None = cls
    description = None
    for part in loc:
        if current is None or part not in current.model_fields:
            return description
        description = current.model_fields[part].description
        current = nested_model(current, part)
    return description


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """A config from an optional YAML file plus command-line overrides."""
    data, lines = load_yaml(path) if path else ({}, LineMap())
    apply_overrides(data, overrides or [], cls)
    return validate(cls, data, source=path, lines=lines)


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
