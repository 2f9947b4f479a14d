"""Several teacher servers behind one teacher: which server gets the next request, and their health.

A server is *up* until a request on it fails in a way another server could fix (refused or reset
connection, timeout, 429/5xx); it is then *down* for ``cooldown_s``. Once the cool-down has passed it is
re-probed by the next request routed to it, one request at a time (a half-open circuit breaker): success
brings it back up, failure starts another cool-down. Requests go to the available server with the fewest
requests in flight, ties taken in turn (round-robin), so one batch spreads over all servers. When no
server is available the one whose cool-down ends first is tried anyway: the caller's retry budget, not
the pool, decides when to give up. Thread-safe: the scoring threads share one pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    down_until: float = 0.0  # 0: up; else down until then, and re-probed after it
    probing: bool = False  # a re-probe request is in flight: the others keep away until it answers

    def available(self, now: float) -> bool:
        return self.down_until == 0.0 or (now >= self.down_until and not self.probing)


class ServerPool:
    """The teacher's servers (``urls``, base URLs ending in /v1), their load and health."""

    def __init__(self, urls: Sequence[str], cooldown_s: float = 10.0) -> None:
        if not urls:
            raise ValueError("a teacher server pool needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"teacher server URLs must differ, got {list(urls)}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.cooldown_s = cooldown_s
        self._servers = [_Server(u) for u in urls]
        self._lock = threading.Lock()
        self._turn = 0  # round-robin start among servers with equal load

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def acquire(self, avoid: Iterable[str] = ()) -> str | None:
        """Reserve the best available server outside ``avoid`` (those the request already failed on) and
        return its URL; None when every such server is down."""
        with self._lock:
            now = time.monotonic()
            best = self._best(set(avoid), now)
            return None if best is None else self._take(best, now)

    def acquire_any(self) -> str:
        """Reserve a server even if all are down: the best available one, else the one whose cool-down
        ends first (a first attempt, or a retry after every server failed)."""
        with self._lock:
            now = time.monotonic()
            best = self._best(set(), now) or min(self._servers, key=lambda s: s.down_until)
            return self._take(best, now)

    def _best(self, avoid: set[str], now: float) -> _Server | None:
        """The available server with the fewest requests in flight, ties taken in turn (round-robin)."""
        n = len(self._servers)
        order = [self._servers[(self._turn + i) % n] for i in range(n)]
        ready = [s for s in order if s.url not in avoid and s.available(now)]
        if not ready:
            return None
        best = min(ready, key=lambda s: s.in_flight)  # min keeps the first of equals, in turn from _turn
        self._turn = (self._servers.index(best) + 1) % n
        return best

    def _take(self, server: _Server, now: float) -> str:
        if server.down_until and now >= server.down_until:
            server.probing = True
        server.in_flight += 1
        server.requests += 1
        return server.url

    def cancel(self, url: str) -> None:
        """Undo ``acquire``: the request was never sent (the batch was aborted)."""
        with self._lock:
            server = self._server(url)
            server.in_flight -= 1
            server.requests -= 1
            server.probing = False

    def release(self, url: str, error: str | None = None, server_down: bool = False) -> None:
        """A request on ``url`` ended: ``error`` describes a failure; ``server_down`` says another server
        could have answered it (the server starts a cool-down). Any answer but such a failure means the
        server is up."""
        with self._lock:
            server = self._server(url)
            server.in_flight -= 1
            server.probing = False
            if error is not None:
                server.failures += 1
                server.last_error = error
            server.down_until = time.monotonic() + self.cooldown_s if server_down else 0.0

    def _server(self, url: str) -> _Server:
        return next(s for s in self._servers if s.url == url)

    def describe(self) -> str:
        """Every server with its state and last error, for an error message."""
        now = time.monotonic()
        with self._lock:
            parts = []
            for s in self._servers:
                state = ("up" if s.down_until == 0.0 else
                         f"down for {s.down_until - now:.1f}s more" if now < s.down_until else "down, to re-probe")
                parts.append(f"{s.url} ({state}; {s.failures} of {s.requests} request(s) failed; last error: "
                             f"{s.last_error or 'none'})")
        return "; ".join(parts)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per server: requests sent, failed, in flight, whether it is up now, its last error."""
        with self._lock:
            return {s.url: {"requests": s.requests, "failures": s.failures, "in_flight": s.in_flight,
                            "up": s.down_until == 0.0, "last_error": s.last_error} for s in self._servers}
