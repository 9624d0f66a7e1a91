"""`hone ui`: a local web app to browse tasks, runs and artifacts, start and watch runs, and chat with artifacts.

- `catalog`: what is on disk (tasks, run folders, artifacts, leaderboards), read without loading models;
- `jobs`: runs and servers started as subprocesses of the real CLI, cancelled by process group, resumed;
- `chat`: the same conversation to two artifacts, through `hone serve`'s model registry;
- `app`: the FastAPI routes and the static page (`static/`: plain HTML, JS and CSS, no build step, nothing
  fetched from the internet); `ui()` runs it under uvicorn.
See docs/ui.md.
"""

from __future__ import annotations

from honellm.ui.config import UIConfig

__all__ = ["UIConfig", "ui"]


def ui(config: UIConfig) -> None:
    """Serve the UI on `config.host:config.port` until interrupted; processes it started are stopped on exit."""
    import sys

    from honellm.errors import MissingDependency

    try:
        import uvicorn

        from honellm.ui.app import create_app
    except ImportError as err:
        raise MissingDependency(f"the UI needs FastAPI and uvicorn ({err.name} is missing)",
                                fix="pip install 'honellm[serve]'") from None
    from honellm.serve.server import _loopback

    _check_port(config.host, config.port)
    app = create_app(config)
    shown = f"[{config.host}]" if ":" in config.host else config.host
    lines = [f"hone ui: http://{shown}:{config.port}/   (runs: {app.state.hone.root})",
             "  auth: " + ("API key required (the page asks for it once)" if config.api_key
                           else "none (pass --api-key or set HONE_API_KEY)")]
    if not config.api_key and not _loopback(config.host):
        lines.append(f"  warning: listening on {config.host} without an API key: anyone who can reach this machine "
                     "can start runs on it")
    print("\n".join(lines), file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                access_log=config.log_level in ("info", "debug"), timeout_graceful_shutdown=5)


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken now, with a fix, rather than after the app is built (uvicorn's own message)."""
    import socket

    from honellm.errors import HoneError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise HoneError(f"cannot listen on {host}:{port} ({err.strerror})", where="hone ui",
                            fix="choose another --port, or stop what is using it") from None
