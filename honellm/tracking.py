"""Experiment tracking: a run's settings and every metrics line also go to TensorBoard, MLflow, W&B or Trackio.

`metrics.jsonl` in the run folder is always written; `report_to` (a field of every training config and of the
prompt search's) adds trackers, several at once. They are accelerate's trackers (`accelerate.tracking`), driven
from the one place every run writes metrics: `RunDir.log_metrics` forwards each line to `Tracking.log`, so steps
(`TrainingMonitor.log_step`), the guard's signals (`kind: guard`, `kind: alarm`), evaluations and the final
`event: done` line with the final evaluation reach the trackers exactly as they reach metrics.jsonl.

What each line becomes: its numbers (nested dicts flattened with "/", booleans as 0/1; strings and lists are
left to metrics.jsonl), named by the line's `event` or `kind` when it has one ("done/accuracy", "guard/kl",
"alarm/length_collapse/..."), plain for step lines ("loss", "lr", "reward"), at the line's step (a prompt
search's candidate lines at their candidate id; the last step seen for other lines without one). The run's config.yaml record goes in once as hyperparameters (flattened).

Where things go by default: TensorBoard event files in `<run>/tensorboard/`, an MLflow file store in
`<run>/mlruns` unless `MLFLOW_TRACKING_URI` names another store, W&B and Trackio where their own settings say
(`WANDB_MODE=offline` keeps W&B local; Trackio is local-first). The project/experiment is the task's name and the
run is the run folder's name.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from honellm.errors import HoneError, MissingDependency

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# tracker -> (module it needs, the pip extra of honellm that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
          "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}
_SKIPPED_KEYS = ("time", "step", "event", "kind", "id")
_RUN_FOLDER_URI: str | None = None  # the MLflow store Hone chose last (a run folder's), not the user's


def _as_list(value):
    """`report_to=tensorboard`, `report_to=tensorboard,mlflow`, `report_to=none` and lists all work."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        value = [v.lower() if isinstance(v, str) else v for v in value]
        return [v for v in value if v != "none"]
    return value


ReportTo = Annotated[list[Literal["tensorboard", "mlflow", "wandb", "trackio"]], BeforeValidator(_as_list)]


def parse_report_to(value) -> list[str]:
    """`report_to` given outside a config (a CLI option): a checked list of tracker names."""
    names = _as_list(value)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise HoneError(f"unknown tracker {unknown[0]!r}", where="report_to",
                        fix=f"use any of: {', '.join(TRACKERS)} (or none)")
    return names


def report_to_field():
    """The `report_to` field every training and search config carries (one definition)."""
    return Field(default_factory=list, description="experiment trackers beside metrics.jsonl: any of tensorboard, "
                                                   "mlflow, wandb, trackio (e.g. report_to=tensorboard,mlflow)")


def check_available(names: list[str]) -> None:
    """A clear error naming the pip extra for the first tracker whose library is not installed."""
    for name in names:
        module, extra = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(f"report_to {name}: the {module!r} package is not installed",
                                    where="report_to", fix=f"pip install 'honellm[{extra}]', or drop {name} from report_to")


class Tracking:
    """The trackers of one run: hyperparameters once, then each metrics line, then finish."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.step = 0

    @classmethod
    def start(cls, names: list[str], *, project: str, run_dir: str | Path, config: dict | None = None) -> Tracking | None:
        """Start the named trackers for the run in `run_dir` (None when there are none)."""
        names = list(dict.fromkeys(names or []))
        if not names:
            return None
        check_available(names)
        run_dir = Path(run_dir)
        trackers = []
        for name in names:
            tracker = _make(name, project=project, run_name=run_dir.name, run_dir=run_dir)
            tracker.start()
            trackers.append(tracker)
        tracking = cls(trackers)
        if config:
            tracking.log_config(config)
        return tracking

    def log_config(self, config: dict) -> None:
        params = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                  for k, v in _flatten(config).items()}
        params = {k: ("None" if v is None else v) for k, v in params.items()}
        for tracker in self.trackers:
            tracker.store_init_configuration(params)

    def log(self, record: dict) -> None:
        """Send one metrics.jsonl line to every tracker."""
        step = self.step
        if isinstance(record.get("step"), int):
            step = self.step = record["step"]
        elif isinstance(record.get("id"), int):
            step = record["id"]  # a search's candidate line: its candidate number is its step
        values = metric_values(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def metric_values(record: dict) -> dict[str, float]:
    """The numbers of one metrics line, named for the trackers (see the module docstring)."""
    prefix = record.get("event") or record.get("kind")
    if record.get("kind") == "alarm" and isinstance(record.get("alarm"), str):
        prefix = f"alarm/{record['alarm']}"
    values: dict[str, float] = {}
    if record.get("kind") == "alarm":
        values[f"{prefix}/raised"] = 1
    for key, value in _flatten({k: v for k, v in record.items() if k not in _SKIPPED_KEYS}).items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[f"{prefix}/{key}" if prefix else key] = value
    return values


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _make(name: str, *, project: str, run_name: str, run_dir: Path):
    import accelerate.tracking as trackers

    if name == "tensorboard":
        return trackers.TensorBoardTracker(run_name="tensorboard", logging_dir=run_dir)
    if name == "mlflow":
        import mlflow

        if mlflow.active_run() is not None:  # an earlier run in this process that crashed before it closed
            mlflow.end_run(status="FAILED")
        global _RUN_FOLDER_URI
        if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", _RUN_FOLDER_URI):
            # No store named by the user (set_tracking_uri also sets the variable, so an earlier run's folder is
            # ours too): the run folder's own file store, which needs no server. MLflow 3 keeps the file store
            # for explicit use only.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            _RUN_FOLDER_URI = (run_dir / "mlruns").resolve().as_uri()
            mlflow.set_tracking_uri(_RUN_FOLDER_URI)
        return trackers.MLflowTracker(experiment_name=project, run_name=run_name)
    if name == "wandb":
        return trackers.WandBTracker(run_name=project, name=run_name, dir=str(run_dir))
    if name == "trackio":
        if not hasattr(trackers, "TrackioTracker"):
            raise MissingDependency("report_to trackio needs accelerate's Trackio tracker (accelerate 1.8 or newer)",
                                    where="report_to", fix="pip install -U accelerate")
        return trackers.TrackioTracker(run_name=project, name=run_name)
    raise ValueError(f"unknown tracker {name!r}")
