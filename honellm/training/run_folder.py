"""A training run's folder, shared by every recipe (`hone tune`, `hone align`): create it, or reopen it to resume.

`open_run` makes `runs/<task>/<method>-<time>/` (or `--out`) on the main process and gives every process its path;
resuming finds the latest run of the task and method when no folder is named, and refuses to continue a run whose
method or settings differ from the ones it started with (the weights would no longer match the checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from honellm.errors import HoneError
from honellm.runs import RunDir, _safe, runs_root
from honellm.tracking import Tracking


def open_run(task, method: str, config, *, out, resume: bool, force: bool, accelerator) -> RunDir:
    """Create (or, resuming, reopen) the run folder on the main process; every process gets its path.

    `config.yaml` records the method, the task and the method's resolved config (a pydantic model).
    """
    from accelerate.utils import broadcast_object_list

    record = {"method": method, "task": task.name, "task_source": task.source,
              "config": config.model_dump(mode="json")}
    path = [None]
    if accelerator.is_main_process:
        if resume and out is None:
            out = latest_run(task.name, method)
        if resume and out is not None and (Path(out) / "config.yaml").exists():
            check_same_config(Path(out) / "config.yaml", record)
        run = RunDir.create(task.name, method, out=out, force=force, resume=resume)
        run.write_config({**record, "processes": accelerator.num_processes})
        run.tracking = Tracking.start(getattr(config, "report_to", []), project=task.name, run_dir=run.path,
                                      config=record)
        path = [str(run.path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(path)
    if not accelerator.is_main_process:
        run = RunDir(Path(path[0]))
    return run


# Settings a resumed run may change: they do not touch the weights.
RESUMABLE_CHANGES = ("report_to",)


def latest_run(task_name: str, method: str) -> Path:
    """The most recent run folder of `method` on task `task_name` (what `--resume` without `--out` continues)."""
    root = runs_root() / _safe(task_name)
    runs = sorted(root.glob(f"{_safe(method)}-*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not runs:
        raise HoneError(f"no earlier {method} run of task {task_name!r} to resume under {root}",
                        fix="pass --out DIR naming the run folder to continue, or drop --resume")
    return runs[-1]


def check_same_config(path: Path, record: dict) -> None:
    """Refuse to resume the run recorded in `path` with another method or other settings."""
    saved = yaml.safe_load(path.read_text()) or {}
    if saved.get("method") != record["method"]:
        raise HoneError(f"this run was started with method {saved.get('method')!r}, not {record['method']!r}",
                        where=str(path), fix="resume with the same --method, or start a new run with --force")
    old, new = saved.get("config", {}), record["config"]
    changed = sorted(k for k in set(old) | set(new) if _plain(old.get(k)) != _plain(new.get(k))
                     and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise HoneError(f"the settings differ from the run being resumed ({diffs})", where=str(path),
                        fix="resume with the settings the run started with (see its config.yaml), or start again "
                            "with --force")


def every(value: int | None, per_epoch: int) -> int:
    """Steps between evaluations or checkpoints: `value`, or twice per epoch when None (0 means never)."""
    if value is None:
        return max(1, per_epoch // 2)
    return value


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
