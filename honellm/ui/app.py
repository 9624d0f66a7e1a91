"""The FastAPI app of `hone ui`: a JSON API under /api and the static page that uses it.

Routes (all under /api need the API key when one is set, checked exactly as `hone serve` checks it):

- GET  /api/tasks, /api/runs, /api/artifacts, /api/methods      what there is to browse and start
- GET  /api/runs/{run}?since=N                                  a run: config, metrics rows from line N, log, leaderboard
- GET  /api/runs/{run}/report                                   a compare run's `hone report` page (written on demand)
- GET  /api/tasks/{task}/report                                 every finished run of a task in one report page
- POST /api/jobs {verb, task, method, budget_seconds, ...}      start `hone compare|tune|align|prompt` (a subprocess)
- GET  /api/jobs, /api/jobs/{id}?since=N                        jobs, with their output, run folder and metrics
- POST /api/jobs/{id}/cancel, /api/jobs/{id}/resume             stop the process group; run again with --resume
- POST /api/serve {artifact}                                    start `hone serve` for an artifact
- POST /api/chat {artifacts: [a, b], messages, max_tokens}      the same conversation to each artifact

The page polls (about once a second) rather than holding server-sent events open: polling carries the API key in
a header like every other call (EventSource cannot send one) and survives the UI restarting.

Requests that change something must be JSON (a cross-site form cannot send that without the browser asking first,
and the UI never says yes), and on a loopback address the Host header must name the loopback (a page on another
site that re-points its DNS name at 127.0.0.1 is refused).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from honellm import __version__
from honellm.errors import HoneError
from honellm.serve.app import ServerState
from honellm.serve.config import ServeConfig
from honellm.serve.errors import NOT_FOUND, SERVER, APIError
from honellm.ui import catalog
from honellm.ui.chat import ChatPool
from honellm.ui.config import UIConfig
from honellm.ui.jobs import JobManager, StartRequest

log = logging.getLogger("honellm.ui")
STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=20_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifacts: list[str] = Field(min_length=1, max_length=2)
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(128, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class ServeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: str = Field(min_length=1)


class UIState:
    """What the routes share: the runs folder, the jobs, the chat models and the key check."""

    def __init__(self, config: UIConfig, *, cwd: Path | None = None, chat: ChatPool | None = None):
        self.config = config
        self.cwd = Path(cwd or Path.cwd()).resolve()
        root = Path(config.runs)
        self.root = (root if root.is_absolute() else self.cwd / root).resolve()
        examples = Path(config.examples) if config.examples else self.cwd / "examples"
        self.examples = examples if examples.is_absolute() else self.cwd / examples
        self.jobs = JobManager(self.root, python=config.python, api_key=config.api_key, cwd=self.cwd)
        self.chat = chat or ChatPool()
        # The key is checked by `hone serve`'s own code: one definition of who may call.
        self._auth = ServerState([], ServeConfig(api_key=config.api_key))

    def authorize(self, request: Request) -> None:
        self._auth.authorize(request)

    def run_path(self, run: str) -> Path:
        return catalog.inside(self.root, run)

    def close(self) -> None:
        self.jobs.close()
        self.chat.close()


def create_app(config: UIConfig | None = None, *, cwd: Path | None = None, chat: ChatPool | None = None) -> FastAPI:
    config = config or UIConfig()
    state = UIState(config, cwd=cwd, chat=chat)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        state.close()

    app = FastAPI(title="Hone UI", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.hone = state

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        host = _host_name(request.headers.get("host", ""))
        if config.host in LOOPBACK_HOSTS and host not in LOOPBACK_HOSTS:
            err = APIError(403, f"this UI answers on the loopback only; Host {host!r} is refused "
                                "(open it as http://127.0.0.1:PORT)", code="bad_host")
            return JSONResponse(err.body(), status_code=403)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            err = APIError(415, "send the request body as JSON (Content-Type: application/json)",
                           code="unsupported_media_type")
            return JSONResponse(err.body(), status_code=415)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HoneError)
    async def _hone_error(_request: Request, err: HoneError):
        api = APIError(404 if isinstance(err, catalog.NotFound) else 400, err.render(),
                       type=NOT_FOUND if isinstance(err, catalog.NotFound) else "invalid_request_error",
                       code="hone_error")
        return JSONResponse(api.body(), status_code=api.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        api = APIError(err.status_code, f"no route {request.url.path}" if err.status_code == 404 else str(err.detail),
                       type=NOT_FOUND if err.status_code == 404 else "invalid_request_error")
        return JSONResponse(api.body(), status_code=api.status)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        log.error("unexpected error in a request", exc_info=err)
        api = APIError(500, f"internal error ({type(err).__name__}: {err}); see the UI's log", type=SERVER)
        return JSONResponse(api.body(), status_code=500)

    # ------------------------------------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no file {name}", type=NOT_FOUND)
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__}

    # ------------------------------------------------------------------------------------------ browsing

    @app.get("/api/info")
    async def info(request: Request):
        state.authorize(request)
        return {"version": __version__, "runs": str(state.root), "cwd": str(state.cwd),
                "auth": bool(config.api_key)}

    @app.get("/api/tasks")
    async def tasks(request: Request):
        state.authorize(request)
        return {"tasks": await run_in_threadpool(catalog.list_tasks, state.root, state.examples)}

    @app.get("/api/methods")
    async def methods(request: Request):
        state.authorize(request)
        return await run_in_threadpool(catalog.method_names)

    @app.get("/api/runs")
    async def runs(request: Request):
        state.authorize(request)
        rows = await run_in_threadpool(catalog.list_runs, state.root)
        for row in rows:
            job = state.jobs.job_for_run(state.root / row["id"])
            row["job"] = state.jobs.info(job) if job else None
        return {"root": str(state.root), "runs": rows, "jobs": [state.jobs.info(j) for j in state.jobs.all()]}

    @app.get("/api/runs/{run:path}/report", response_class=HTMLResponse)
    async def run_report(run: str, request: Request):
        state.authorize(request)
        path = state.run_path(run)
        if not (path / "compare.json").exists():
            raise APIError(404, "only a compare run has a report; open the task's report for single runs",
                           type=NOT_FOUND, code="no_report")
        return HTMLResponse(await run_in_threadpool(_compare_report, path))

    @app.get("/api/runs/{run:path}")
    async def run_detail(run: str, request: Request, since: int = 0):
        state.authorize(request)
        path = state.run_path(run)
        detail = await run_in_threadpool(catalog.run_detail, state.root, path, since=max(since, 0))
        job = state.jobs.job_for_run(path)
        detail["job"] = state.jobs.info(job) if job else None
        if job is not None:
            detail["output"] = catalog.log_tail(job.log)  # the process's own output says more than log.txt
        return detail

    @app.get("/api/tasks/{task}/report", response_class=HTMLResponse)
    async def task_report(task: str, request: Request):
        state.authorize(request)
        return HTMLResponse(await run_in_threadpool(catalog.task_report, state.root, task))

    @app.get("/api/artifacts")
    async def artifacts(request: Request):
        state.authorize(request)
        return {"artifacts": await run_in_threadpool(catalog.list_artifacts, state.root)}

    # ------------------------------------------------------------------------------------------ jobs

    @app.post("/api/jobs")
    async def start(request: Request):
        state.authorize(request)
        body = _validate(StartRequest, await request.json())
        job = await run_in_threadpool(state.jobs.start, body)
        return state.jobs.info(job)

    @app.get("/api/jobs")
    async def jobs(request: Request):
        state.authorize(request)
        return {"jobs": [state.jobs.info(j) for j in state.jobs.all()]}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str, request: Request, since: int = 0):
        state.authorize(request)
        found = state.jobs.get(job_id)
        out = state.jobs.info(found)
        out["output"] = catalog.log_tail(found.log)
        run_dir = state.jobs.find_run_dir(found)
        if run_dir is not None and run_dir.is_dir() and catalog.is_run(run_dir):
            out["detail"] = await run_in_threadpool(catalog.run_detail, state.root, run_dir, since=max(since, 0))
        return out

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        state.authorize(request)
        return state.jobs.info(state.jobs.cancel(job_id))

    @app.post("/api/jobs/{job_id}/resume")
    async def resume(job_id: str, request: Request):
        state.authorize(request)
        return state.jobs.info(await run_in_threadpool(state.jobs.resume, job_id))

    @app.post("/api/serve")
    async def serve(request: Request):
        state.authorize(request)
        body = _validate(ServeRequest, await request.json())
        path = _artifact_path(state, body.artifact)
        return state.jobs.info(await run_in_threadpool(state.jobs.serve, path))

    # ------------------------------------------------------------------------------------------ chat

    @app.post("/api/chat")
    async def chat(request: Request):
        state.authorize(request)
        body = _validate(ChatRequest, await request.json())
        paths = [_artifact_path(state, a) for a in body.artifacts]
        started = time.perf_counter()
        answers = await run_in_threadpool(state.chat.chat, paths, [m.model_dump() for m in body.messages],
                                          max_tokens=body.max_tokens, temperature=body.temperature)
        return {"answers": answers, "seconds": round(time.perf_counter() - started, 3)}

    return app


def _host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:7860" -> "[::1]", "localhost:7860" -> "localhost")."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _validate(model, data):
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=where, code="invalid_request") from None


def _artifact_path(state: UIState, artifact: str) -> Path:
    path = state.run_path(artifact)
    if not (path / "hone.json").exists():
        raise APIError(404, f"{artifact!r} is not an artifact in the runs folder", type=NOT_FOUND,
                       param="artifact", code="artifact_not_found")
    return path


def _compare_report(path: Path) -> str:
    """The compare run's report.html, written again when compare.json is newer (a run still going)."""
    from honellm.compare.report import write_report

    report, plan = path / "report.html", path / "compare.json"
    if not report.exists() or report.stat().st_mtime < plan.stat().st_mtime:
        write_report(path)
    return report.read_text(encoding="utf-8")
