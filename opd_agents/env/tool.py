"""`@tool`: plain or async functions (and methods) become validated, schema-exporting tools.

The signature and the Google-style docstring become a pydantic input model; that model validates the
model's arguments and exports the OpenAI function schema the chat template shows. Every failure mode
(unknown tool, bad arguments, exception, timeout, oversized output) becomes a ToolResult with an
ErrorType instead of an exception, so a rollout never crashes on model output. CPU-bound tools can run
in a killable worker process (``isolation="process"``), so a runaway call cannot freeze the rollout.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import functools
import importlib
import inspect
import multiprocessing
import pickle
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, Field

from opd_agents.errors import ToolDefinitionError
from opd_agents.types import ErrorType, ToolCall, ToolResult

T = TypeVar("T")
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_\-]{0,63}$")
MAX_ERROR_CHARS = 300
WORKER_START_TIMEOUT_S = 60.0  # importing the tool's module in a fresh interpreter; not part of a call's timeout
Isolation = Literal["thread", "process"]


class StopEpisode(Exception):
    """Raise from a tool to end the episode (stop_reason=tool_stop); the message is the observation."""


def shorten(text: str, limit: int, marker: str = " ... [truncated]") -> str:
    return text if len(text) <= limit else text[: max(0, limit - len(marker))] + marker


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {arg: description})."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    arg_indent: int | None = None  # indentation of "name: ..." lines; deeper lines are continuations
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if re.match(r"^(Args|Arguments|Parameters):\s*$", stripped):
            section, current, arg_indent = "args", None, None
            continue
        if re.match(r"^(Returns|Raises|Yields|Examples?|Notes?):\s*$", stripped):
            section, current = "other", None
            continue
        if section == "args":
            m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and (arg_indent is None or indent <= arg_indent):
                current, arg_indent = m.group(1), indent
                params[current] = m.group(3)
            elif current and stripped:
                params[current] += " " + stripped
        elif section is None:
            summary.append(line)
    return " ".join(s.strip() for s in summary if s.strip()), params


def format_validation_error(err: pydantic.ValidationError, limit: int = MAX_ERROR_CHARS) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "arguments"
        parts.append(f"{loc}: {e['msg']} (got {shorten(repr(e.get('input')), 40)})")
    return shorten("; ".join(parts), limit)


class Tool:
    """A callable tool with a pydantic input model. Create it with the ``@tool`` decorator.

    How a call runs, and what ``timeout_s`` can do about a call that does not end:

    - ``async def``: on the event loop. The timeout cancels it at its next ``await``; use for I/O.
    - plain ``def``, ``isolation="thread"`` (the default): in a worker thread (~0.3 ms per call in all).
      On timeout the call gets a ``timeout`` result, but a thread cannot be killed: a call that never
      returns keeps running (and burning a core) for the life of the process, and a pure-Python or C
      loop that holds the GIL (a huge ``2**10**9``) can stall the whole process. Use for functions
      that are fast or bounded by construction (the calculator bounds every operation), I/O-bound
      functions, closures and methods.
    - plain ``def``, ``isolation="process"``: in a persistent worker process (~0.5 ms per call; starting
      a worker, once per concurrent caller and after every kill, takes about half a second, ~30 MB,
      and is not counted in the timeout). On timeout the worker is SIGKILLed, the call gets a
      ``timeout`` result and the next call starts a fresh worker. Use for CPU-bound code that may not
      terminate. The function must be defined at module level (the worker imports it by name; closures, lambdas
      and methods are refused here, with a ToolDefinitionError), its arguments are copied to the worker
      and its result comes back as text, so it cannot share state with the caller. As with any
      multiprocessing code, a script using such a tool needs the ``if __name__ == "__main__":`` guard
      (workers start by forkserver or spawn, never fork, and import the main module).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = 10.0,
        max_output_chars: int = 2000,
        isolation: Isolation = "thread",
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME_RE.match(self.name):
            raise ToolDefinitionError(f"tool name {self.name!r} must match {_NAME_RE.pattern}")
        summary, arg_docs = _parse_docstring(fn.__doc__)
        self.description = description or summary or self.name
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.is_async = inspect.iscoroutinefunction(fn)
        self.isolation = isolation
        if isolation == "process":
            _check_process_isolation(self.name, fn, self.is_async)
        elif isolation != "thread":
            raise ToolDefinitionError(f"tool {self.name!r}: isolation must be 'thread' or 'process', got {isolation!r}")
        self._bound_to: Any = None
        self.input_model = self._build_input_model(fn, arg_docs)
        functools.update_wrapper(self, fn)

    def _build_input_model(self, fn: Callable[..., Any], arg_docs: dict[str, str]) -> type[BaseModel]:
        fields: dict[str, Any] = {}
        params = list(inspect.signature(fn).parameters.values())
        if params and params[0].name in ("self", "cls"):
            params = params[1:]
        hints = _type_hints(fn)
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ToolDefinitionError(f"tool {self.name!r}: *args/**kwargs are not supported ({p.name})")
            if p.name not in hints:
                raise ToolDefinitionError(f"tool {self.name!r}: parameter {p.name!r} needs a type annotation")
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (hints[p.name], Field(default, description=arg_docs.get(p.name)))
        config = pydantic.ConfigDict(extra="forbid")
        return pydantic.create_model(f"{self.name}_input", __config__=config, **fields)

    def __get__(self, instance: Any, owner: type | None = None) -> Tool:
        """Accessed through an instance, a method tool binds to it (like a function)."""
        if instance is None:
            return self
        bound = copy.copy(self)
        bound._bound_to = instance
        return bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._bound_to is not None:
            return self.fn(self._bound_to, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def schema(self) -> dict[str, Any]:
        """OpenAI function-calling form: {"type": "function", "function": {name, description, parameters}}."""
        params = self.input_model.model_json_schema()
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": params},
        }

    async def acall(self, call: ToolCall) -> ToolResult:
        """Validate and run one call; every failure becomes a typed ToolResult."""
        start = time.perf_counter()

        def result(content: str, error: ErrorType | None = None, stop: bool = False) -> ToolResult:
            return ToolResult(
                call_id=call.id, name=self.name, content=content, error_type=error,
                duration_s=time.perf_counter() - start, stop_episode=stop,
            )

        try:
            args = self.input_model.model_validate(call.arguments)
        except pydantic.ValidationError as e:
            return result(f"Invalid arguments for {self.name}: {format_validation_error(e)}",
                          ErrorType.validation_failed)
        kwargs = {k: getattr(args, k) for k in type(args).model_fields}
        try:
            if self.is_async:
                out = await asyncio.wait_for(self(**kwargs), timeout=self.timeout_s)
            elif self.isolation == "process":
                out = await _pool_of(self.fn).call(kwargs, self.timeout_s, self.max_output_chars)
            else:
                # On timeout the thread is abandoned (see the class docstring; isolation="process" kills).
                out = await asyncio.wait_for(asyncio.to_thread(self, **kwargs), timeout=self.timeout_s)
            text = out if isinstance(out, str) else str(out)  # inside the try: a broken __str__ is reported
        except (asyncio.TimeoutError, TimeoutError) as e:  # ours, or the tool's own (e.g. a killed subprocess)
            detail = f": {e}" if str(e) else f" after {self.timeout_s}s"
            return result(f"Tool {self.name} timed out{detail}", ErrorType.timeout)
        except StopEpisode as e:
            return result(shorten(str(e), self.max_output_chars), stop=True)
        except Exception as e:  # noqa: BLE001 - any tool exception is reported to the model
            msg = shorten(f"Tool execution failed: {type(e).__name__}: {e}", MAX_ERROR_CHARS)
            res = result(msg, ErrorType.execution_failed)
            res.stop_episode = isinstance(e, self._fatal_exceptions)
            return res
        return result(shorten(text, self.max_output_chars, marker=" ... [truncated]"))

    _fatal_exceptions: tuple[type[BaseException], ...] = ()


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn, include_extras=True)  # keep Annotated[..., Field(...)] constraints
    except Exception as e:  # noqa: BLE001
        raise ToolDefinitionError(f"cannot resolve type hints of {fn.__name__}: {e}") from e


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = 10.0,
    max_output_chars: int = 2000,
    isolation: Isolation = "thread",
) -> Any:
    """Decorator: ``@tool`` or ``@tool(name=..., timeout_s=..., isolation="process")`` on a function, async
    function or method (see ``Tool`` for which isolation to choose)."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, timeout_s=timeout_s,
                    max_output_chars=max_output_chars, isolation=isolation)

    return wrap(fn) if fn is not None else wrap


class ToolBox:
    """The tools an episode can call, by name; executes parsed calls in order."""

    def __init__(self, tools: Iterable[Tool], fatal_exceptions: Sequence[type[BaseException]] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            if not isinstance(t, Tool):
                raise ToolDefinitionError(f"{t!r} is not a Tool; decorate it with @tool")
            if t.name in self.tools:
                raise ToolDefinitionError(f"duplicate tool name {t.name!r}")
            if fatal_exceptions:
                t = copy.copy(t)
                t._fatal_exceptions = tuple(fatal_exceptions)
            self.tools[t.name] = t

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    async def aexecute(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """One result per call, in order; calls after one that ended the episode are not executed."""
        results: list[ToolResult] = []
        for call in calls:  # in order: later calls may depend on earlier side effects
            if any(r.stop_episode for r in results):
                results.append(ToolResult(
                    call_id=call.id, name=call.name, error_type=ErrorType.not_executed,
                    content="Not executed: an earlier call in this message ended the episode",
                ))
                continue
            t = self.tools.get(call.name)
            if t is None:
                available = ", ".join(sorted(self.tools)) or "(none)"
                results.append(ToolResult(
                    call_id=call.id, name=call.name, error_type=ErrorType.tool_not_found,
                    content=f"Unknown tool {shorten(call.name, 60)!r}. Available tools: {available}",
                ))
                continue
            results.append(await t.acall(call))
        return results

    def execute(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        return run_sync(self.aexecute(calls))


# ---- process isolation ---------------------------------------------------------------------------------
def _check_process_isolation(name: str, fn: Callable[..., Any], is_async: bool) -> None:
    """Refuse at definition time what a worker process could not import by name."""
    problem = None
    qualname = getattr(fn, "__qualname__", "")
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if is_async:
        problem = "an async function already yields to the event loop; process isolation is for plain functions"
    elif not qualname.isidentifier():  # "<lambda>", "outer.<locals>.f", "Class.method"
        problem = f"{qualname!r} is not a module-level function (closures, lambdas and methods cannot be imported)"
    elif module is None or (module.__name__ == "__main__" and not getattr(module, "__file__", None)):
        problem = f"module {fn.__module__!r} cannot be imported by a worker (interactive __main__?)"
    if problem:
        raise ToolDefinitionError(f"tool {name!r} with isolation='process': {problem}")


def _mp_context() -> multiprocessing.context.BaseContext:
    # Never fork: this process has threads (the tool loop, torch), and a forked child can deadlock.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling, else a RuntimeError that keeps its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(conn: Connection, module: str, qualname: str) -> None:
    """Worker process: import the tool's function once, then run calls until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it ends the workers)
    try:
        fn = getattr(importlib.import_module(module), qualname)
        fn = fn.fn if isinstance(fn, Tool) else fn  # @tool rebinds the module-level name to the Tool
    except Exception as e:  # noqa: BLE001
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", None))
    while True:
        try:
            kwargs, limit = conn.recv()
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            out = fn(**kwargs)
            reply: tuple[str, Any] = ("ok", shorten(out if isinstance(out, str) else str(out), limit))
        except Exception as e:  # noqa: BLE001 - reported as the thread mode would
            reply = ("error", _portable(e))
        conn.send(reply)


class _Worker:
    def __init__(self, module: str, qualname: str) -> None:
        ctx = _mp_context()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, module, qualname), daemon=True,
                                   name=f"opd-tool-{qualname}")
        self.process.start()
        child.close()  # so the worker's death reads as EOF here
        if not self.conn.poll(WORKER_START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"the tool's worker process did not start within {WORKER_START_TIMEOUT_S:.0f}s")
        kind, payload = self._receive()
        if kind != "ready":
            self.kill()
            raise payload

    def _receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise RuntimeError(f"the tool's worker process died (exit code {self.process.exitcode})") from None

    async def call(self, kwargs: dict[str, Any], max_output_chars: int) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        self.conn.send((kwargs, max_output_chars))
        readable = loop.create_future()
        # Wait on the pipe from the loop itself: no thread is held, so a killed call leaves nothing behind.
        loop.add_reader(self.conn.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(self.conn.fileno())
        return self._receive()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: a call spinning in C or holding the GIL cannot ignore it
        self.process.join(5.0)
        self.conn.close()


class _WorkerPool:
    """Idle workers of one function; a call takes one (or starts one) and gives it back unless killed."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    return worker
                worker.kill()  # reaps a worker that died between calls
        return _Worker(self.module, self.qualname)

    async def call(self, kwargs: dict[str, Any], timeout_s: float | None, max_output_chars: int) -> str:
        worker = await asyncio.to_thread(self._take)  # a start-up is not part of the call's time budget
        try:
            kind, payload = await asyncio.wait_for(worker.call(kwargs, max_output_chars), timeout=timeout_s)
        except BaseException:  # timeout, cancellation or a dead worker: never reuse one in an unknown state
            worker.kill()
            raise
        with self._lock:
            self._idle.append(worker)
        if kind == "error":
            raise payload  # the tool's own exception (StopEpisode, TimeoutError, ...), as in thread mode
        return payload


_POOLS: dict[tuple[str, str], _WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool_of(fn: Callable[..., Any]) -> _WorkerPool:
    """One pool per function, shared by every copy of its Tool (ToolBox and method binding copy tools)."""
    key = (fn.__module__, fn.__qualname__)
    with _POOLS_LOCK:
        return _POOLS.setdefault(key, _WorkerPool(*key))


class _LoopThread:
    """One background event loop so sync code (gymnasium's step) can run async tools from any context,
    including inside a notebook that already has a running loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="opd-tools", daemon=True).start()
                atexit.register(self._loop.call_soon_threadsafe, self._loop.stop)
            return self._loop


_LOOP = _LoopThread()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, _LOOP.loop()).result()
