"""The explorer's HTTP server: the page's three files, `/api/meta`, `/api/predict` and
`/api/stats`, on 127.0.0.1 only (stdlib `ThreadingHTTPServer`: one thread per request).

A request the server cannot serve gets a 4xx status and a JSON body {"error": message}; one
that fails inside gets a 500 the same way. Neither stops the server. Limits: bodies of at most
`MAX_BODY_BYTES` (larger ones are answered 413 before their body is read), a Host header naming
this server (a page elsewhere cannot reach it through DNS rebinding), and a socket timeout for
clients that stop sending.
"""

from __future__ import annotations

import errno
import importlib.resources
import json
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from cnn_jax.errors import ConfigError, DataError
from cnn_jax.explore.network import Explorer, ImageTooLarge

HOST = "127.0.0.1"
MAX_BODY_BYTES = 8 * 2**20
# A refused body up to this size is read and dropped, so the client gets to read the 413
# (closing on a client still sending makes it see a reset instead); past it, the connection is
# simply closed.
DRAIN_BYTES = 64 * 2**20
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def static_files() -> dict[str, bytes]:
    """The page's files, from the installed package (`cnn_jax/explore/static/`)."""
    folder = importlib.resources.files("cnn_jax.explore") / "static"
    return {name: (folder / name).read_bytes() for name, _ in STATIC_FILES.values()}


class Timings:
    """Milliseconds per answered /api/predict request, by stage; thread-safe."""

    STAGES = ("read", "decode", "model", "encode", "total")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, list[float]] = {s: [] for s in self.STAGES}

    def add(self, ms: dict[str, float]) -> None:
        with self._lock:
            for stage in self.STAGES:
                self._values[stage].append(float(ms[stage]))

    def summary(self) -> dict[str, Any]:
        """{"requests": n, stage: {"median", "p90", "max"} in ms}."""
        with self._lock:
            values = {s: np.asarray(v) for s, v in self._values.items()}
        n = len(values["total"])
        out: dict[str, Any] = {"requests": n}
        for stage, v in values.items():
            if n:
                out[stage] = {
                    "median": round(float(np.median(v)), 3),
                    "p90": round(float(np.percentile(v, 90)), 3),
                    "max": round(float(v.max()), 3),
                }
        return out


class ExplorerServer(ThreadingHTTPServer):
    """Serves one `Explorer` on 127.0.0.1:`port` (0: a free port; see `.url`).

    `explorer` may be given later with `attach` (the CLI takes the port before it loads and
    compiles the model, so a port in use is reported at once); until then the API answers 503.
    """

    daemon_threads = True  # a hung client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, explorer: Explorer | None, port: int = 8765, *, quiet: bool = True):
        self.quiet = quiet
        self.files = static_files()
        self.timings = Timings()
        self.explorer: Explorer | None = None
        self.meta_json = b""
        if explorer is not None:
            self.attach(explorer)
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port {port} is not a TCP port; expected 0..65535 (0: any free)")
        try:
            super().__init__((HOST, port), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"--port {port}: {HOST}:{port} is already in use; choose another port, or "
                    "--port 0 for any free one"
                ) from None
            if e.errno == errno.EACCES:
                raise ConfigError(
                    f"--port {port}: not allowed to listen on {HOST}:{port} (ports below 1024 "
                    "need privileges); choose a port above 1023, or --port 0"
                ) from None
            raise

    def attach(self, explorer: Explorer) -> None:
        self.meta_json = json.dumps(explorer.meta()).encode()
        self.explorer = explorer

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def handle_error(self, request, client_address) -> None:
        # A client that went away mid-answer is not news; anything else is printed, and the
        # server goes on either way.
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    server_version = "cnn-jax-explore"
    timeout = 20  # seconds a client may pause mid-request (socket timeout)

    # ------------------------------------------------------------------------------------------
    # Answers

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", close)

    def _fail(self, status: HTTPStatus | int, message: str, close: bool = False) -> None:
        self._json(int(status), {"error": message, "status": int(status)}, close)

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _host_ok(self) -> bool:
        """The Host header names this server (an address or localhost, with its port)."""
        host = (self.headers.get("Host") or "").strip().lower()
        allowed = {f"{name}:{self.server.port}" for name in (HOST, "localhost")}
        if host in allowed:
            return True
        self._fail(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"Host {host or '(none)'!r} is not this server; open {self.server.url}",
        )
        return False

    # ------------------------------------------------------------------------------------------
    # Methods

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(200, self.server.files[name], content_type)
        elif path.startswith("/api/") and self.server.explorer is None:
            self._fail(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; try again")
        elif path == "/api/meta":
            self._send(200, self.server.meta_json, "application/json")
        elif path == "/api/stats":
            self._json(200, self.server.timings.summary())
        elif path == "/api/predict":
            self._fail(
                HTTPStatus.METHOD_NOT_ALLOWED, "POST an image to /api/predict (GET is not served)"
            )
        else:
            self._fail(HTTPStatus.NOT_FOUND, f"no such page: {path!r}")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        start = time.perf_counter()
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path != "/api/predict":
            self._drain(self._content_length(quiet=True) or 0)
            self._fail(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path!r}", close=True)
            return
        body = self._read_body()
        if body is None:
            return
        if self.server.explorer is None:
            self._fail(HTTPStatus.SERVICE_UNAVAILABLE, "the model is still loading; try again")
            return
        read = time.perf_counter()
        try:
            response = self.server.explorer.predict(body, self.headers.get("Content-Type", ""))
        except ImageTooLarge as e:
            self._fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e))
            return
        except DataError as e:
            self._fail(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # noqa: BLE001 -- a bug: say so, print it, keep serving
            traceback.print_exc()
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")
            return
        ms = dict(response["ms"], read=1e3 * (read - start))
        payload = json.dumps(response).encode()
        ms["total"] = 1e3 * (time.perf_counter() - start)
        self.server.timings.add(ms)
        self._send(200, payload, "application/json")

    def _not_allowed(self) -> None:
        self._drain(self._content_length(quiet=True) or 0)
        self._fail(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served here", True)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # ------------------------------------------------------------------------------------------
    # Request bodies

    def _content_length(self, quiet: bool = False) -> int | None:
        text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            if not quiet:
                self._fail(
                    HTTPStatus.LENGTH_REQUIRED,
                    "chunked bodies are not accepted; send a Content-Length",
                    close=True,
                )
            return None
        if text is None:
            if not quiet:
                self._fail(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required", True)
            return None
        try:
            value = int(text)
            if value < 0:
                raise ValueError
        except ValueError:
            if not quiet:
                self._fail(
                    HTTPStatus.BAD_REQUEST, f"Content-Length {text!r} is not a byte count", True
                )
            return None
        return value

    def _read_body(self) -> bytes | None:
        """The body, or None after answering why not (no length, too large, cut short)."""
        length = self._content_length()
        if length is None:
            return None
        if length > MAX_BODY_BYTES:
            message = (
                f"the body is {length:,} bytes; at most {MAX_BODY_BYTES:,} are accepted "
                "(send a smaller image)"
            )
            self._drain(length)
            self._fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, close=True)
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:  # the client stopped sending (socket timeout)
            body = b""
        if len(body) != length:
            self._fail(
                HTTPStatus.BAD_REQUEST,
                f"the body ended after {len(body)} of its {length} bytes (Content-Length)",
                close=True,
            )
            return None
        return body

    def _drain(self, length: int) -> None:
        """Reads and drops a refused body (up to DRAIN_BYTES), so the answer can be read."""
        if length > DRAIN_BYTES:
            return
        self.connection.settimeout(2)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 2**20))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass


def serve(explorer: Explorer, port: int = 8765, *, ready=None, quiet: bool = True) -> Timings:
    """Serves `explorer` until interrupted (Ctrl-C); returns the request timings.
    `ready(server)` is called once the socket listens (the CLI prints the address)."""
    with ExplorerServer(explorer, port, quiet=quiet) as server:
        if ready is not None:
            ready(server)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        return server.timings
