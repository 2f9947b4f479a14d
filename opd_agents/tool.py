"""`@tool`: plain or async functions (and methods) become validated, schema-exporting tools.

The signature and the Google-style docstring become a pydantic input model; that model validates the
model's arguments and exports the OpenAI function schema the chat template shows. Every failure mode
(unknown tool, bad arguments, exception, timeout, oversized output) becomes a ToolResult with an
ErrorType instead of an exception, so a rollout never crashes on model output.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import functools
import inspect
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, Field

from opd_agents.errors import ToolDefinitionError
from opd_agents.types import ErrorType, ToolCall, ToolResult

T = TypeVar("T")
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_\-]{0,63}$")
MAX_ERROR_CHARS = 300


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
    """A callable tool with a pydantic input model. Create it with the ``@tool`` decorator."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = 10.0,
        max_output_chars: int = 2000,
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
            else:
                # A sync tool runs in a worker thread; on timeout the thread is abandoned, so tools that
                # must be *killed* (code execution) enforce their own limit in a subprocess.
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
) -> Any:
    """Decorator: ``@tool`` or ``@tool(name=..., timeout_s=...)`` on a function, async function or method."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, timeout_s=timeout_s, max_output_chars=max_output_chars)

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
        results = []
        for call in calls:  # in order: later calls may depend on earlier side effects
            t = self.tools.get(call.name)
            if t is None:
                available = ", ".join(sorted(self.tools)) or "(none)"
                results.append(ToolResult(
                    call_id=call.id, name=call.name, error_type=ErrorType.tool_not_found,
                    content=f"Unknown tool {shorten(call.name, 60)!r}. Available tools: {available}",
                ))
                continue
            res = await t.acall(call)
            results.append(res)
            if res.stop_episode:
                break
        return results

    def execute(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        return run_sync(self.aexecute(calls))


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
