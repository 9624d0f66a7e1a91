"""Run folders: `runs/<task>/<method>-<timestamp>/` with the resolved config, `metrics.jsonl` and the log.

An existing folder is never overwritten without `force`, except one that a run left when it stopped before its
first step (`never_started`: a refused setting or a data error found after the folder was made), which holds nothing
trained; the rerun replaces it. `metrics.jsonl` gets one JSON object per line, flushed at once, so a killed run
keeps every metric it logged.

`observe_metrics(callback)` lets a caller watch every line any run folder logs while it is active (the
hyperparameter search reads the validation rows the recipes already write, to prune poor trials early); an
exception the callback raises goes up through the recipe that logged the line, after the line is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from honellm.atomic import atomic_write_text
from honellm.errors import HoneError

RUNS_ROOT = Path("runs")
_OBSERVERS: list[Callable[[RunDir, dict], None]] = []


@contextmanager
def observe_metrics(callback: Callable[[RunDir, dict], None]) -> Iterator[None]:
    """Call `callback(run, record)` after every metrics line any RunDir writes inside the `with` block."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def runs_root() -> Path:
    """Where run folders go: `HONE_RUNS`, else `runs/` in the current folder."""
    return Path(os.environ.get("HONE_RUNS", RUNS_ROOT))


class RunDir:
    """A run's folder: `config.yaml`, `metrics.jsonl`, `log.txt`, checkpoints, and the artifact."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._metrics = None
        self._handler: logging.Handler | None = None
        self.tracking = None  # honellm.tracking.Tracking when the run's config has report_to

    @classmethod
    def create(cls, task_name: str, method: str, *, out: str | Path | None = None, force: bool = False,
               resume: bool = False, root: str | Path | None = None) -> RunDir:
        """Make the folder. With `out` it is exactly that folder; otherwise a new timestamped one."""
        if out is not None:
            path = Path(out)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(root or runs_root()) / _safe(task_name) / f"{_safe(method)}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = path.with_name(f"{_safe(method)}-{stamp}-{n}")
        if path.exists() and any(path.iterdir()) and not resume:
            if not force:
                if not never_started(path):
                    raise HoneError("the run folder already exists and is not empty", where=str(path),
                                    fix="pass --force to replace it, --resume to continue it, or choose another --out")
                logging.getLogger(__name__).info("replacing %s: a run that stopped before its first step left it",
                                                 path)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.attach_log()
        return run

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    def log_metrics(self, step: int | None = None, **values) -> None:
        """Append one line to metrics.jsonl (time and step included)."""
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - kept open
        record = {"time": round(time.time(), 3)}
        if step is not None:
            record["step"] = step
        record.update(values)
        self._metrics.write(json.dumps(record, default=_plain) + "\n")
        self._metrics.flush()
        if self.tracking is not None:
            self.tracking.log(record)
        for callback in list(_OBSERVERS):
            callback(self, record)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path / "metrics.jsonl")

    def attach_log(self) -> None:
        """Copy Hone's log records into `log.txt` in the run folder."""
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("honellm").addHandler(handler)
        logging.getLogger("honellm").setLevel(logging.INFO)
        self._handler = handler

    def close(self) -> None:
        if self.tracking is not None:
            self.tracking.finish()
            self.tracking = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._handler is not None:
            logging.getLogger("honellm").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What a run leaves when it stops before its first step (a refused setting, a data error, the memory pre-flight,
# all found once the folder exists because they need the loaded model or the device): its record, its log, the
# metrics rows logged before "start" and the files made with the folder. Nothing in it was trained.
_BEFORE_FIRST_STEP = {"config.yaml", "log.txt", "metrics.jsonl", "initial-adapter", "tensorboard", "mlruns", "wandb"}


def never_started(path: str | Path) -> bool:
    """Whether `path` is a run folder that stopped before training began, which a rerun may replace without --force.

    True only when the folder holds Hone's `config.yaml` (a method, a task and their config), nothing outside what
    a run writes before its first step, and no "start" or "resume" row in `metrics.jsonl`. A checkpoint, an
    artifact, a started run's metrics or any file of the user's keeps the folder protected.
    """
    path = Path(path)
    names = {entry.name for entry in path.iterdir()}
    if "config.yaml" not in names or not names <= _BEFORE_FIRST_STEP:
        return False
    try:
        record = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(record, dict) or not {"method", "task", "config"} <= set(record):  # open_run's record
        return False
    return not any(isinstance(row, dict) and row.get("event") in ("start", "resume")
                   for row in read_metrics(path / "metrics.jsonl"))


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill; the rest is good
    return rows


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "run"


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
