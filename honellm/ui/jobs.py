"""Runs and servers the UI starts: each is the real CLI (`python -m honellm VERB ...`) in its own process group.

Why subprocesses: a run started from the page is exactly the run the command line would make (same run folder,
same metrics.jsonl, same resume), it cannot take the UI down with it, and cancelling it is one signal to its
process group (accelerate or torch workers included). The argument list is built here from a validated request
and never goes through a shell; overrides that look like options are refused, so a page cannot add flags.

The run folder is named up front with `--out` (tune, align, compare) so the page can watch its metrics.jsonl
from the first line; `hone prompt` chooses its own folder, which is found as the new run folder of its task.
Stopping the UI stops the processes it started (training runs continue later with Resume, i.e. `--resume`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from honellm.config import Config
from honellm.errors import HoneError
from honellm.runs import _safe
from honellm.ui.catalog import NotFound

VERBS = ("compare", "tune", "align", "prompt")
TERMINATE_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when cancelling


class StartRequest(Config):
    """What the start form sends; every field maps to one CLI argument."""

    verb: Literal["compare", "tune", "align", "prompt"] = Field(description="the hone verb to run")
    task: str = Field(min_length=1, description="a task YAML path or a built-in task name")
    method: str | None = Field(None, description="tune/align: the method (lora, dpo, ...)")
    methods: str | None = Field(None, description="compare: comma-separated methods (default: Hone's list)")
    budget_seconds: float | None = Field(None, gt=0, description="wall-clock budget: compare --budget per method; "
                                                                 "tune/align max_seconds; prompt --max-minutes")
    search: int | None = Field(None, ge=1, description="prompt: try N candidate programs (--search N)")
    limit: int | None = Field(None, ge=1, description="compare: judge on the first N examples (--limit)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, as on the command line")


@dataclass(eq=False)
class Job:
    """One process the UI started: a run (`kind="run"`) or a model server (`kind="server"`)."""

    id: str
    kind: str
    verb: str
    argv: list[str]  # after `python -m honellm`
    log: Path
    started: float
    task: str | None = None
    run_dir: Path | None = None
    url: str | None = None  # servers: the OpenAI base URL
    process: subprocess.Popen | None = None
    ended: float | None = None
    returncode: int | None = None
    cancelled: bool = False
    request: StartRequest | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def state(self) -> str:
        if self.returncode is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if self.returncode == 0 else "failed"

    def command(self) -> str:
        import shlex

        return "hone " + " ".join(shlex.quote(a) for a in self.argv)


class JobManager:
    """Starts, watches, cancels and resumes the UI's processes."""

    def __init__(self, runs_root: Path, *, python: str | None = None, api_key: str | None = None,
                 cwd: Path | None = None):
        self.runs_root = Path(runs_root).resolve()
        self.python = python or sys.executable
        self.api_key = api_key
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- starting

    def start(self, request: StartRequest) -> Job:
        task_name = task_name_of(request.task, self.cwd)
        argv, run_dir = build_argv(request, task_name, self.runs_root)
        return self._spawn("run", request.verb, argv, task=task_name, run_dir=run_dir, request=request)

    def resume(self, job_id: str) -> Job:
        """Start the job's command again with `--resume` on the same run folder (tune, align, compare)."""
        old = self.get(job_id)
        if old.kind != "run" or old.verb == "prompt":
            raise HoneError(f"a {old.verb} job cannot be resumed", where=f"job {job_id}",
                            fix="start it again (hone prompt has no --resume)")
        if old.state == "running":
            raise HoneError("the job is still running", where=f"job {job_id}", fix="cancel it first, or wait")
        argv = [a for a in old.argv if a != "--resume"] + ["--resume"]
        return self._spawn("run", old.verb, argv, task=old.task, run_dir=old.run_dir, request=old.request)

    def serve(self, artifact: Path, *, host: str = "127.0.0.1", port: int | None = None) -> Job:
        """`hone serve ARTIFACT` on a free loopback port (the UI's API key, if any, protects it too)."""
        port = port or free_port(host)
        argv = ["serve", str(artifact), "--host", host, "--port", str(port), "--log-level", "warning"]
        shown = f"[{host}]" if ":" in host else host
        return self._spawn("server", "serve", argv, url=f"http://{shown}:{port}/v1")

    def _spawn(self, kind: str, verb: str, argv: list[str], **extra) -> Job:
        job_id = uuid.uuid4().hex[:10]
        logs = self.runs_root / ".hone-ui" / "jobs"
        logs.mkdir(parents=True, exist_ok=True)
        job = Job(job_id, kind, verb, argv, logs / f"{job_id}.log", time.time(), **extra)
        env = dict(os.environ, HONE_RUNS=str(self.runs_root), PYTHONUNBUFFERED="1")
        if self.api_key:
            env["HONE_API_KEY"] = self.api_key  # servers read it; never on the command line, where ps shows it
        else:
            env.pop("HONE_API_KEY", None)
        with open(job.log, "wb") as out:
            # start_new_session: the job gets its own process group, so cancel reaches every process it starts.
            job.process = subprocess.Popen([self.python, "-m", "honellm", *argv], cwd=self.cwd, env=env,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        with self._lock:
            self.jobs[job_id] = job
        threading.Thread(target=self._watch, args=(job,), name=f"hone-ui-job-{job_id}", daemon=True).start()
        return job

    def _watch(self, job: Job) -> None:
        code = job.process.wait()
        with job._lock:
            job.returncode, job.ended = code, time.time()

    # ---------------------------------------------------------------------------------------------- reading

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", where="hone ui", fix="pick a job from the run list")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return list(self.jobs.values())

    def find_run_dir(self, job: Job) -> Path | None:
        """The job's run folder: named by --out, or (hone prompt) the new folder of its task since it started."""
        if job.run_dir is not None or job.kind != "run" or not job.task:
            return job.run_dir
        folder = self.runs_root / _safe(job.task)
        claimed = {j.run_dir for j in self.all() if j.run_dir is not None}
        fresh = [p for p in folder.glob("prompt*-*")
                 if p.is_dir() and p not in claimed and p.stat().st_mtime >= job.started - 1]
        if fresh:
            job.run_dir = min(fresh, key=lambda p: p.stat().st_mtime)
        return job.run_dir

    def job_for_run(self, run_dir: Path) -> Job | None:
        """The latest job writing `run_dir` (None when the run was not started from this UI)."""
        run_dir = run_dir.resolve()
        found = [j for j in self.all() if j.kind == "run" and self.find_run_dir(j)
                 and j.run_dir.resolve() == run_dir]
        return max(found, key=lambda j: j.started, default=None)

    def info(self, job: Job) -> dict:
        run_dir = self.find_run_dir(job)
        info = {"id": job.id, "kind": job.kind, "verb": job.verb, "state": job.state, "command": job.command(),
                "task": job.task, "started": job.started, "ended": job.ended, "returncode": job.returncode,
                "run": run_dir.relative_to(self.runs_root).as_posix() if run_dir else None, "url": job.url,
                "resumable": job.kind == "run" and job.verb != "prompt" and job.state != "running"}
        if job.kind == "server":
            info["ready"] = job.state == "running" and _listening(job.url)
        return info

    # ---------------------------------------------------------------------------------------------- stopping

    def cancel(self, job_id: str) -> Job:
        """SIGTERM to the job's process group; SIGKILL if it is still there after TERMINATE_GRACE seconds."""
        job = self.get(job_id)
        if job.state != "running":
            return job
        job.cancelled = True
        _signal_group(job.process, signal.SIGTERM)
        threading.Thread(target=_reap, args=(job.process,), daemon=True).start()
        return job

    def close(self) -> None:
        """Stop every process this UI started (called when the UI shuts down)."""
        running = [j for j in self.all() if j.state == "running"]
        for job in running:
            job.cancelled = True
            _signal_group(job.process, signal.SIGTERM)
        for job in running:
            _reap(job.process)


# -------------------------------------------------------------------------------------------------- helpers


def task_name_of(task: str, cwd: Path) -> str:
    """The task's name as its run folders spell it: a built-in's name, else the YAML's `name:`."""
    import yaml

    from honellm.builtin import builtin_task_path

    path = Path(task) if Path(task).is_absolute() else cwd / task
    if not path.is_file():
        if builtin_task_path(task) is not None:
            return task
        raise HoneError(f"task not found: {task}", where="hone ui",
                        fix="pick a task from the task list, or give a YAML path relative to where `hone ui` runs")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise HoneError(f"cannot read the task YAML ({err})", where=str(path), fix="fix the file") from None
    return str(data.get("name") or path.stem) if isinstance(data, dict) else path.stem


def build_argv(request: StartRequest, task_name: str, runs_root: Path) -> tuple[list[str], Path | None]:
    """The CLI arguments for `request`, and the run folder they name (None for `hone prompt`)."""
    for item in request.overrides:
        if item.startswith("-") or "=" not in item:
            raise HoneError(f"{item!r} is not a key=value override", where="overrides",
                            fix="write settings as key=value (e.g. lr=1e-4 max_steps=20); options are fields of "
                                "the form")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = runs_root / _safe(task_name)
    argv = [request.verb, request.task, *request.overrides]
    budget = request.budget_seconds
    if request.verb in ("tune", "align"):
        if not request.method:
            raise HoneError(f"hone {request.verb} needs a method", where="method", fix="pick one from the list")
        run_dir = _unique(folder / f"{_safe(request.method)}-{stamp}")
        argv += ["--method", request.method, "--out", str(run_dir)]
        if budget:
            argv.append(f"max_seconds={budget:g}")
    elif request.verb == "compare":
        run_dir = _unique(folder / f"compare-{stamp}")
        argv += ["--out", str(run_dir)]
        if request.methods:
            argv += ["--methods", request.methods]
        if budget:
            argv += ["--budget", f"{budget:g}s"]
        if request.limit:
            argv += ["--limit", str(request.limit)]
    else:
        run_dir = None
        if request.search:
            argv += ["--search", str(request.search)]
        if budget:
            argv += ["--max-minutes", f"{max(budget / 60, 0.1):g}"]
    return argv, run_dir


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(url: str | None) -> bool:
    from urllib.parse import urlparse

    if not url:
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=0.2):
            return True
    except OSError:
        return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _reap(process: subprocess.Popen) -> None:
    try:
        process.wait(TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
