"""The tuning methods, all registered: look one up by name, list them, read a method's config.

`registry.py` holds the table and `register_method`; the methods register beside their definitions
(`methods.py`); this module imports them, so a lookup here always sees every built-in method.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from honellm.config import LineMap, apply_overrides, load_yaml, validate
from honellm.errors import HoneError
from honellm.tuning import methods  # noqa: F401 - registers the built-in methods
from honellm.tuning.registry import METHODS, TuningMethod


def get_method(name: str) -> TuningMethod:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(f"unknown tuning method {name!r}", where="--method",
                        fix=f"{hint}methods: {', '.join(METHODS)} (hone tune --methods describes them)")
    return METHODS[name]


def all_methods() -> dict[str, TuningMethod]:
    return dict(METHODS)


def method_config(method: str | None, path: str | Path | None = None, overrides: list[str] | None = None):
    """(method, its validated config) from an optional YAML file and `key=value` overrides.

    The YAML may name the method (`method: lora`); `method` given here wins. Unknown keys are errors that name
    the closest valid key of that method's config.
    """
    data, lines = load_yaml(path) if path else ({}, LineMap())
    in_file = data.pop("method", None)
    name = method or in_file
    if name is None:
        raise HoneError("no tuning method given", fix="pass --method NAME (hone tune --methods lists them)")
    spec = get_method(name)
    apply_overrides(data, overrides or [], spec.config)
    return spec, validate(spec.config, data, source=path, lines=lines)
