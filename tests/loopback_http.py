"""A real HTTP server on 127.0.0.1 for tests: ``"METHOD /path"`` routes answer (status, JSON)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[[dict[str, Any]], tuple[int, Any]]


@contextlib.contextmanager
def json_server(routes: dict[str, Route]) -> Iterator[str]:
    """Serve ``routes`` (anything else is a 404) and yield the OpenAI-style api_base ``http://.../v1``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self.route({})

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            self.route(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def route(self, body: dict[str, Any]) -> None:
            handler = routes.get(f"{self.command} {self.path}")
            status, payload = handler(body) if handler else (404, {"detail": "Not Found"})
            data = json.dumps(payload).encode()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out and left
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True  # a handler still sleeping at teardown must not block the test process
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
