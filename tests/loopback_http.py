"""A real HTTP server on 127.0.0.1 for tests: ``"METHOD /path"`` routes answer (status, JSON)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Route = Callable[[dict[str, Any]], tuple[int, Any]]


class LoopbackServer:
    """Serve ``routes`` (anything else is a 404) at ``api_base`` (``http://.../v1``) until ``kill()``: then,
    as when the process dies, new connections are refused and requests in flight are reset unanswered."""

    def __init__(self, routes: dict[str, Route]) -> None:
        killed = self.killed = threading.Event()
        owner = self
        self._active = 0  # requests being handled
        self._idle = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                self.route({})

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                self.route(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def route(self, body: dict[str, Any]) -> None:
                with owner._idle:
                    owner._active += 1
                try:
                    self.answer(body)
                finally:
                    with owner._idle:
                        owner._active -= 1
                        owner._idle.notify_all()

            def answer(self, body: dict[str, Any]) -> None:
                handler = routes.get(f"{self.command} {self.path}")
                status, payload = handler(body) if handler else (404, {"detail": "Not Found"})
                if killed.is_set():  # linger 0: closing sends a TCP reset, as a dead process's kernel does
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a handler still sleeping at teardown must not block the test process
        self.api_base = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._closed = threading.Lock()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        """Stop at once (idempotent; callable from a route, i.e. from a handler thread)."""
        self.killed.set()
        if self._closed.acquire(blocking=False):
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Kill, then let the routes still running finish (bounded): a handler thread still inside torch
        when the test process exits aborts it (C++ terminate, exit code 134)."""
        self.kill()
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=10.0)


@contextlib.contextmanager
def json_server(routes: dict[str, Route]) -> Iterator[str]:
    """Serve ``routes`` and yield the OpenAI-style api_base ``http://.../v1``."""
    with LoopbackServer(routes) as server:
        yield server.api_base
