"""User code named in a task YAML (`python: my_rewards.py:brevity`, `python: my_tools.py:lookup`): the one importer.

A file is imported once per process, as a plain module, only when a spec names it; its path is relative to the task
YAML's folder. Errors say which file, which function, and what the file does define.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from honellm.errors import HoneError

_USER_MODULES: dict[Path, Any] = {}


def import_function(reference: str, base_dir: str | Path = ".", where: str = "task", kind: str = "reward"
                    ) -> tuple[Callable[..., Any], str]:
    """`file.py:function` -> (the function, "file.py:function" for messages). `kind` names it in errors."""
    file_part, sep, function_name = reference.rpartition(":")
    if not sep or not file_part or not function_name:
        raise HoneError(f"{reference!r} does not name a function", where=where,
                        fix=f"write `python: my_{kind}s.py:function_name` (the file, a colon, then the function)")
    path = (Path(base_dir) / file_part).resolve()
    if not path.is_file():
        raise HoneError(f"{kind} file {file_part!r} not found (looked for {path})", where=where,
                        fix="give the path relative to the task YAML's folder, or an absolute path")
    module = _USER_MODULES.get(path)
    if module is None:
        name = f"hone_user_{kind}s_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise HoneError(f"importing {path.name} failed: {type(err).__name__}: {err}", where=str(path),
                            fix="fix the error above; the file is imported as a plain module") from err
        _USER_MODULES[path] = module
    function = getattr(module, function_name, None)
    if not callable(function):
        available = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        close = difflib.get_close_matches(function_name, available, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(f"{path.name} has no function {function_name!r}", where=where,
                        fix=f"{hint}functions in the file: {', '.join(available) or 'none'}")
    return function, f"{path.name}:{function_name}"
