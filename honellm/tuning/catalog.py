"""The PEFT adapters (and full fine-tuning), all registered: look one up by name, list them.

`registry.py` holds the table and `register_method`; the methods register beside their definitions
(`methods.py`); this module imports them, so a lookup here always sees every built-in method.
"""

from __future__ import annotations

import difflib

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
