"""The what-if page's web server: the standard library's ``http.server``, JSON endpoints, static files.

Why the standard library: the page is local and single-user, a handful of JSON requests a second;
``ThreadingHTTPServer`` serves that with no dependency to install, pin or audit, and keeps the
simulation in this process (no worker, no framework). Endpoints:

* ``GET /`` and ``GET /static/NAME``: the page (``pipetrain/ui/static``; no CDN, no network);
* ``GET /api/state``: the plan, its knobs, its evaluation and (given a RUN_DIR) the measured run;
* ``POST /api/simulate`` ``{"knobs": {...}}``: the edit's evaluation (:meth:`WhatIf.evaluate`);
* ``POST /api/save`` ``{"knobs": {...}, "name": "NAME.json"}``: writes the edited plan into the
  directory the ui was given;
* ``GET /files/PATH``: a file under the directories the ui was given (the run's files).

It touches files only under the directories it was given (and its own static folder): a path
that resolves outside them, by ``..``, an absolute path or a symlink, is refused with 403.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipetrain.errors import ConfigError, PipetrainError
from pipetrain.reports.rundir import RunDir
from pipetrain.ui.rundash import run_dashboard
from pipetrain.ui.whatif import Knobs, WhatIf

__all__ = ["STATIC_DIR", "UiApp", "UiServer", "inside", "start_server"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
_MAX_BODY = 1 << 20
_SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.json")


class Forbidden(PipetrainError):
    """A request for a path outside the directories the ui was given (HTTP 403)."""


def inside(root: Path, rel: str) -> Path:
    """``root/rel`` resolved, refused (:class:`Forbidden`) unless it stays under ``root``."""
    base = root.resolve()
    target = (base / rel.lstrip("/")).resolve() if not Path(rel).is_absolute() else Path(rel).resolve()
    if not target.is_relative_to(base):
        raise Forbidden(f"{rel!r} is outside the directories this page may read")
    return target


@dataclass(kw_only=True)
class UiApp:
    """What the handler serves: the what-if model, the directories it may touch, the run (if any)."""

    whatif: WhatIf
    save_dir: Path
    roots: tuple[Path, ...]
    source: str = ""
    source_plan: Path | None = None
    run: RunDir | None = None
    _dashboard: dict[str, Any] | None = field(default=None, repr=False)

    def state(self) -> dict[str, Any]:
        if self.run is not None and self._dashboard is None:
            self._dashboard = run_dashboard(self.run)  # read once: the run's files do not change while the page is open
        return {"plan": self.whatif.describe(), "evaluation": self.whatif.evaluate(self.whatif.knobs).to_json(),
                "run": self._dashboard, "save_dir": str(self.save_dir), "source": self.source}

    def knobs_of(self, body: Any) -> Knobs:
        if not isinstance(body, dict):
            raise ConfigError("request body must be a JSON object")
        return Knobs.from_json(body.get("knobs"), self.whatif.plan.num_stages)

    def save(self, body: Any) -> dict[str, Any]:
        knobs = self.knobs_of(body)
        name = body.get("name") or "whatif-plan.json"
        if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name:
            raise Forbidden(f"plan name {name!r}: plans are saved only into {self.save_dir}")
        if not _SAVE_NAME.fullmatch(name):
            raise ConfigError(f"plan name {name!r}: use letters, digits, '.', '_' or '-', ending in .json")
        path = inside(self.save_dir, name)
        if self.source_plan is not None and path == self.source_plan.resolve():
            raise ConfigError(f"{name} is the plan this page was opened with: save the edit under another name")
        plan = self.whatif.plan_to_save(knobs)
        plan.save(path)
        return {"path": str(path), "name": name, "step_time_s": plan.predicted.step_time_s if plan.predicted else None}

    def file(self, rel: str) -> Path:
        """A file under one of the roots (the first that has it)."""
        for root in self.roots:
            p = inside(root, rel)
            if p.is_file():
                return p
        raise FileNotFoundError(rel)


class _Handler(BaseHTTPRequestHandler):
    app: UiApp  # set on the subclass start_server makes
    server_version = "pipetrain-ui"
    quiet = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)

    # ----- responses -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the page loads nothing from elsewhere; the timeline SVG is markup, no script
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, msg: str) -> None:
        self._json(status, {"error": msg})

    def _file(self, path: Path) -> None:
        self._send(HTTPStatus.OK, path.read_bytes(), _TYPES.get(path.suffix.lower(), "application/octet-stream"))

    def _path(self) -> str:
        return unquote(urlsplit(self.path).path)

    # ----- routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self._path()
        try:
            if path in ("/", "/index.html"):
                self._file(STATIC_DIR / "index.html")
            elif path.startswith("/static/"):
                p = inside(STATIC_DIR, path[len("/static/"):])
                if not p.is_file():
                    raise FileNotFoundError(path)
                self._file(p)
            elif path == "/api/state":
                self._json(HTTPStatus.OK, self.app.state())
            elif path.startswith("/files/"):
                self._file(self.app.file(path[len("/files/"):]))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except Forbidden as exc:
            self._error(HTTPStatus.FORBIDDEN, str(exc))
        except (FileNotFoundError, IsADirectoryError):
            self._error(HTTPStatus.NOT_FOUND, f"no such file: {path}")
        except PipetrainError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self._path()
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 <= n <= _MAX_BODY:
                raise ConfigError(f"request body of {n} bytes is too large")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"request body is not JSON: {exc}") from None
            if path == "/api/simulate":
                self._json(HTTPStatus.OK, self.app.whatif.evaluate(self.app.knobs_of(body)).to_json())
            elif path == "/api/save":
                self._json(HTTPStatus.OK, self.app.save(body))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        except Forbidden as exc:
            self._error(HTTPStatus.FORBIDDEN, str(exc))
        except (PipetrainError, ValueError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _ThreadingHTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class UiServer:
    """A running page: ``url``, and :meth:`close` (the server runs in a daemon thread)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_server(app: UiApp, *, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> UiServer:
    """Serve ``app`` on ``host:port`` (port 0: a free one) from a daemon thread."""
    handler = type("UiHandler", (_Handler,), {"app": app, "quiet": quiet})
    httpd = (_ThreadingHTTPServer6 if ":" in host else ThreadingHTTPServer)((host, port), handler)  # ":": IPv6 (``--host ::1``)
    httpd.daemon_threads = True
    # a short poll interval: close() (and so a test's teardown) waits at most this long for the loop to stop
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="pipetrain-ui", daemon=True)
    thread.start()
    return UiServer(httpd, thread)
