"""User-facing errors: what went wrong, where, and what to do.

The CLI prints a `HoneError` as a few plain lines (no traceback) and exits non-zero. Anything else that escapes
is a bug in Hone and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class HoneError(Exception):
    """An error the user can fix. `where` is a file, `file:line` or a config key; `fix` says what to do."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}\n  fix: {self.fix}" if self.fix else head


class MissingDependency(HoneError):
    """A package or model that is not installed; `fix` is the exact command that installs it."""


@dataclass(frozen=True)
class Problem:
    """One problem found in user data or config, located by `where` (usually `file:line`)."""

    where: str
    what: str
    field: str | None = None

    def __str__(self) -> str:
        field = f" [{self.field}]" if self.field else ""
        return f"{self.where}:{field} {self.what}"


class DataError(HoneError):
    """Several problems in a data file; all are listed so the user can fix them in one pass."""

    def __init__(self, problems: list[Problem], *, fix: str | None = None, limit: int = 20):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        n = len(self.problems)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in the data:\n{shown}{more}",
            fix=fix or "fix the records above, or pass --skip-invalid to skip them (they are counted and listed)",
        )


class NotYetAvailable(HoneError):
    """A verb or method whose issue has not landed yet."""
