"""Tool-call parsers: assistant text -> tool calls, parse errors, or a final answer.

Each parser also knows the stop string that closes a call, so the sampler can stop right after it.
All of them run in time linear in the message length: no pattern may rescan the text from every start
position (a lazy ``.*?``, or a whitespace run spanning lines retried at each line, made ReAct cubic on blank
lines). The env caps the message length as well (``EnvLimits.max_message_chars``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from opd_agents.env.tool import shorten
from opd_agents.types import ToolCall


@dataclass
class ParsedTurn:
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one "formatting issue" detail per malformed call

    @property
    def is_final(self) -> bool:
        """No call attempted at all: the message is the final answer."""
        return not self.calls and not self.errors


def _call_from_json(raw: str) -> tuple[ToolCall | None, str | None]:
    try:
        obj: Any = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON in tool call ({e.msg} at char {e.pos}): {shorten(raw.strip(), 80)}"
    except (ValueError, RecursionError) as e:  # >4300-digit ints, nesting deeper than the recursion limit
        return None, f"invalid JSON in tool call ({shorten(str(e), 80)})"
    return _call_from_obj(obj)


def _call_from_obj(obj: Any) -> tuple[ToolCall | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"tool call must be a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, 'tool call is missing a string "name"'
    if "arguments" not in obj and "parameters" not in obj:  # Llama-3 writes "parameters"
        return None, f'tool call to {name!r} is missing "arguments"'
    args = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(args, str):  # some models emit arguments as a JSON string (OpenAI wire format)
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None, f'"arguments" of {name!r} is a string that is not valid JSON'
    if not isinstance(args, dict):
        return None, f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}'
    return ToolCall(name=name, arguments=args), None


class ToolCallParser:
    name: str = ""
    stop_strings: tuple[str, ...] = ()
    format_instructions: str = ""

    def parse(self, text: str) -> ParsedTurn:
        raise NotImplementedError

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        """How an expert (or a test) writes a call in this format."""
        raise NotImplementedError


class HermesParser(ToolCallParser):
    """Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the default)."""

    name = "hermes"
    stop_strings = ("</tool_call>",)
    format_instructions = (
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    _open, _close = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> ParsedTurn:
        out = ParsedTurn()
        pos = 0
        while (start := text.find(self._open, pos)) != -1:
            end = text.find(self._close, start)
            if end == -1:
                out.errors.append("unterminated <tool_call> tag (missing </tool_call>)")
                break
            call, err = _call_from_json(text[start + len(self._open) : end])
            out.calls.append(call) if call else out.errors.append(err or "invalid tool call")
            pos = end + len(self._close)
        if self._close in text[pos:] or (not out.calls and not out.errors and self._close in text):
            out.errors.append("</tool_call> without an opening <tool_call>")
        return out

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"{self._open}\n{json.dumps({'name': name, 'arguments': arguments})}\n{self._close}"


class FencedJsonParser(ToolCallParser):
    """Markdown fenced blocks tagged ``tool_call``: ```tool_call\\n{json}\\n```."""

    name = "fenced_json"
    stop_strings = ()
    format_instructions = (
        "To call a function, write a fenced block tagged tool_call containing a json object:\n"
        '```tool_call\n{"name": <function-name>, "arguments": <args-json-object>}\n```'
    )
    _open, _fence = "```tool_call", "```"
    _line_end = re.compile(r"\s*\n")  # the tag ends its line; the JSON starts after the last blank line

    def parse(self, text: str) -> ParsedTurn:
        # str.find, not one regex: a lazy body retried after each newline of a blank run was quadratic.
        out = ParsedTurn()
        pos = last = 0
        while (start := text.find(self._open, pos)) != -1:
            pos = start + len(self._open)
            head = self._line_end.match(text, pos)
            if head is None:  # "```tool_call" inside a line is not a block
                continue
            end = text.find(self._fence, head.end())
            if end == -1:
                break
            call, err = _call_from_json(text[head.end() : end])
            out.calls.append(call) if call else out.errors.append(err or "invalid tool call")
            pos = last = end + len(self._fence)
        if self._open in text[last:]:
            out.errors.append("unterminated ```tool_call block (missing closing ```)")
        return out

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"```tool_call\n{json.dumps({'name': name, 'arguments': arguments})}\n```"


class ReActParser(ToolCallParser):
    """ReAct: ``Action: <tool>`` then ``Action Input: {json}``; ``Final Answer:`` (or no action) ends."""

    name = "react"
    stop_strings = ("Observation:",)
    format_instructions = (
        "To call a function, write:\nAction: <function-name>\nAction Input: <args-json-object>\n"
        "When you know the answer, write:\nFinal Answer: <answer>"
    )
    # [ \t], not \s: "Action:\nAction Input: ..." must not read the next line as the tool name.
    _action = re.compile(r"^[ \t]*Action:[ \t]*(.*)$", re.M)
    # Markers start a line after horizontal whitespace only ([^\S\n]), so each attempt stays on one line.
    _input = re.compile(r"^[^\S\n]*Action Input:", re.M)
    _input_end = re.compile(r"^[^\S\n]*(?:Action:|Observation:|Final Answer:)", re.M)

    def parse(self, text: str) -> ParsedTurn:
        out = ParsedTurn()
        actions = list(self._action.finditer(text))
        for i, m in enumerate(actions):
            name = m.group(1).strip()
            segment_end = actions[i + 1].start() if i + 1 < len(actions) else len(text)
            inp = self._input.search(text, m.end(), segment_end)
            if not name:
                out.errors.append("Action: line without a tool name")
            elif inp is None:
                out.errors.append(f"Action {name!r} has no 'Action Input:' line")
            else:
                end = self._input_end.search(text, inp.end(), segment_end)
                raw = text[inp.end() : end.start() if end else segment_end]
                call, err = _call_from_json(json.dumps({"name": name, "arguments": _loads_or_raw(raw)}))
                out.calls.append(call) if call else out.errors.append(err or "invalid tool call")
        return out

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"Action: {name}\nAction Input: {json.dumps(arguments)}\n"


def _json_values(text: str, pos: int) -> tuple[list[Any], str | None]:
    """Consecutive JSON values from ``pos`` (separated by whitespace or ``;``); raw_decode is linear."""
    values: list[Any] = []
    decoder = json.JSONDecoder()
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos == len(text):
            return values, None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return values, f"invalid JSON in tool call ({e.msg} at char {e.pos}): {shorten(text[pos:].strip(), 80)}"
        except (ValueError, RecursionError) as e:
            return values, f"invalid JSON in tool call ({shorten(str(e), 80)})"
        values.append(value)


class Llama3JsonParser(ToolCallParser):
    """Llama 3.1+ JSON calls: ``{"name": ..., "parameters": {...}}`` (several may follow each other,
    separated by ``;``; an optional ``<|python_tag|>`` first), from the first line that opens one to the
    end of the message, so a reasoning line may come first. With no such line the message is the final
    answer. The turn ends with the end-of-turn token, so no stop string."""

    name = "llama3_json"
    stop_strings = ()
    format_instructions = (
        "To call a function, end your message with a json object of the form "
        '{"name": <function-name>, "parameters": <args-json-object>} on its own line.'
    )
    _tag = "<|python_tag|>"
    _start = re.compile(r"(?:^|\n)[ \t]*(?:<\|python_tag\|>[ \t]*)?(?=\{)")  # only a line start may open a call

    def parse(self, text: str) -> ParsedTurn:
        out = ParsedTurn()
        start = self._start.search(text)
        if start is None:
            return out
        values, err = _json_values(text, start.end())
        for v in values:
            call, call_err = _call_from_obj(v)
            out.calls.append(call) if call else out.errors.append(call_err or "invalid tool call")
        if err:
            out.errors.append(err)
        return out

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": arguments})


class MistralParser(ToolCallParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after optional text; the turn
    ends with the end-of-turn token (``</s>``), so no stop string."""

    name = "mistral"
    stop_strings = ()
    format_instructions = (
        "To call functions, write [TOOL_CALLS] followed by a json list of calls: "
        '[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}]'
    )
    _tag = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedTurn:
        out = ParsedTurn()
        start = text.find(self._tag)
        while start != -1:  # each [TOOL_CALLS] opens a list that runs to the next one (or the end)
            nxt = text.find(self._tag, start + len(self._tag))
            values, err = _json_values(text[start + len(self._tag) : len(text) if nxt == -1 else nxt], 0)
            if not values and not err:
                out.errors.append("[TOOL_CALLS] without a json list of calls")
            for v in values:
                for item in v if isinstance(v, list) else [v]:
                    call, call_err = _call_from_obj(item)
                    out.calls.append(call) if call else out.errors.append(call_err or "invalid tool call")
            if err:
                out.errors.append(err)
            start = nxt
        return out

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"{self._tag}{json.dumps([{'name': name, 'arguments': arguments}])}"


def _loads_or_raw(raw: str) -> Any:
    try:
        return json.loads(raw.strip())
    except (ValueError, RecursionError):
        return raw.strip()  # reported as "arguments must be a JSON object" by _call_from_json


PARSERS: dict[str, type[ToolCallParser]] = {
    p.name: p for p in (HermesParser, FencedJsonParser, ReActParser, Llama3JsonParser, MistralParser)}


def get_parser(name: str) -> ToolCallParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; allowed: {sorted(PARSERS)}") from None
