"""Progress display shared by every long operation: a bar with rate and ETA, plus live metrics."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar (rate and ETA shown by default); quiet when HONE_QUIET=1."""
    if disable is None:
        disable = os.environ.get("HONE_QUIET") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.1, **kwargs)


@contextmanager
def status(message: str):
    """A one-line note on stderr around a step that has no measurable progress."""
    if os.environ.get("HONE_QUIET") != "1":
        print(f"hone: {message} ...", file=sys.stderr, flush=True)
    yield
