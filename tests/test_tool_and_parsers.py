from __future__ import annotations

import asyncio
import random
import string
import time
from typing import Literal

import pytest

from opd_agents.errors import ToolDefinitionError
from opd_agents.env.parsers import (PARSERS, FencedJsonParser, HermesParser, Llama3JsonParser, MistralParser,
                                    ReActParser, ToolCallParser, get_parser)
from opd_agents.env.tool import StopEpisode, Tool, ToolBox, tool
from opd_agents.types import ErrorType, ToolCall, ToolResult


# ---- tools used below ---------------------------------------------------------------------------------
@tool
def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Longer explanation that is still part of the summary.

    Args:
        a: The first addend.
        b (int): The second addend,
            continued on a second line.
            Note: must fit in 64 bits.

    Returns:
        The sum.
    """
    return a + b


@tool(name="lookup", description="Look a word up.", timeout_s=0.2, max_output_chars=50)
def lookup_word(word: str, mode: Literal["short", "long"] = "short") -> str:
    return word * (100 if mode == "long" else 1)


@tool(timeout_s=0.2)
def slow_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@tool(timeout_s=0.2)
async def slow_async(seconds: float) -> str:
    """Sleep asynchronously."""
    await asyncio.sleep(seconds)
    return "done"


@tool
def explode(message: str) -> str:
    raise KeyError(message)


@tool
def finish(answer: str) -> str:
    raise StopEpisode(f"final: {answer}")


@tool(max_output_chars=40)
def structured(n: int) -> dict[str, list[int]]:
    return {"values": list(range(n))}


class _BadStr:
    def __str__(self) -> str:
        raise RuntimeError("cannot render")


@tool
def unrenderable() -> object:
    return _BadStr()


class Counter:
    def __init__(self) -> None:
        self.total = 0

    @tool
    def bump(self, by: int) -> str:
        """Increase the counter.

        Args:
            by: How much to add.
        """
        self.total += by
        return str(self.total)


def call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(name=name, arguments=dict(arguments))


def run(t: Tool, **arguments: object) -> ToolResult:
    return ToolBox([t]).execute([call(t.name, **arguments)])[0]


# ---- @tool: schema ---------------------------------------------------------------------------------
def test_schema_openai_form() -> None:
    assert add.schema() == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers. Longer explanation that is still part of the summary.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first addend."},
                    "b": {"type": "integer", "default": 2, "description": "The second addend, continued on a "
                          "second line. Note: must fit in 64 bits."},
                },
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    }


def test_schema_name_description_override_and_enum() -> None:
    fn = lookup_word.schema()["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look a word up."
    assert fn["parameters"]["properties"]["mode"] == {"enum": ["short", "long"], "type": "string", "default": "short"}
    assert fn["parameters"]["required"] == ["word"]
    assert "description" not in fn["parameters"]["properties"]["word"]  # no docstring, no description


def test_schema_without_docstring_uses_name() -> None:
    assert explode.schema()["function"]["description"] == "explode"


def test_decorated_function_still_callable() -> None:
    assert add(3) == 5 and add.__name__ == "add" and add.__doc__.startswith("Add two")


def test_missing_annotation_is_a_definition_error() -> None:
    with pytest.raises(ToolDefinitionError, match="parameter 'b' needs a type annotation"):
        @tool
        def bad(a: int, b) -> int:  # noqa: ANN001
            return a


def test_varargs_and_bad_name_are_definition_errors() -> None:
    with pytest.raises(ToolDefinitionError, match=r"\*args/\*\*kwargs"):
        @tool
        def bad(*xs: int) -> int:
            return 0
    with pytest.raises(ToolDefinitionError, match="must match"):
        tool(name="has space")(add.fn)


def test_toolbox_rejects_plain_functions_and_duplicates() -> None:
    with pytest.raises(ToolDefinitionError, match="decorate it with @tool"):
        ToolBox([len])  # type: ignore[list-item]
    with pytest.raises(ToolDefinitionError, match="duplicate tool name 'add'"):
        ToolBox([add, add])


# ---- @tool: execution and every failure mode ------------------------------------------------------
def test_valid_call() -> None:
    res = run(add, a=3, b=4)
    assert res.ok and res.content == "7" and res.name == "add" and res.duration_s >= 0


def test_default_argument_used() -> None:
    assert run(add, a=3).content == "5"


def test_validation_failed_wrong_type() -> None:
    res = run(add, a="three")
    assert res.error_type is ErrorType.validation_failed
    assert res.content.startswith("Invalid arguments for add: a: Input should be a valid integer")
    assert "(got 'three')" in res.content


def test_validation_failed_missing_and_extra() -> None:
    res = run(add, b=1, c=5)
    assert res.error_type is ErrorType.validation_failed
    assert "a: Field required" in res.content and "c: Extra inputs are not permitted" in res.content


def test_validation_message_is_shortened() -> None:
    res = run(add, a="x" * 5000, b="y" * 5000)
    assert res.error_type is ErrorType.validation_failed
    assert "x" * 100 not in res.content and "y" * 100 not in res.content  # each bad input is cut...
    assert res.content.count("[truncated]") == 2 and len(res.content) < 300  # ...and the message stays short


def test_execution_failed_format() -> None:
    res = run(explode, message="boom")
    assert res.error_type is ErrorType.execution_failed
    assert res.content == "Tool execution failed: KeyError: 'boom'"
    assert res.stop_episode is False


def test_execution_failed_message_shortened() -> None:
    res = run(explode, message="x" * 10_000)
    assert res.content.startswith("Tool execution failed: KeyError: 'xxx") and len(res.content) <= 300
    assert res.content.endswith("[truncated]")


def test_broken_str_of_result_is_an_execution_failure() -> None:
    res = run(unrenderable)
    assert res.error_type is ErrorType.execution_failed
    assert res.content == "Tool execution failed: RuntimeError: cannot render"


def test_sync_timeout() -> None:
    start = time.perf_counter()
    res = run(slow_sync, seconds=1.0)
    assert res.error_type is ErrorType.timeout
    assert res.content == "Tool slow_sync timed out after 0.2s"
    assert time.perf_counter() - start < 0.9


def test_async_timeout_and_success() -> None:
    start = time.perf_counter()
    res = run(slow_async, seconds=5.0)
    assert res.error_type is ErrorType.timeout and time.perf_counter() - start < 1.0
    assert run(slow_async, seconds=0.0).content == "done"


def test_oversized_output_truncated() -> None:
    res = run(lookup_word, word="abc", mode="long")
    assert res.ok and len(res.content) == 50 and res.content.endswith("[truncated]")
    assert res.content.startswith("abcabc")


def test_non_string_output_is_str_and_truncated() -> None:
    assert run(structured, n=3).content == "{'values': [0, 1, 2]}"
    long = run(structured, n=100).content
    assert long.startswith("{'values': [0, 1") and long.endswith(" ... [truncated]") and len(long) == 40


def test_method_tool_bound_to_instance() -> None:
    counter = Counter()
    bound = counter.bump
    assert isinstance(bound, Tool) and Counter.bump._bound_to is None
    schema = bound.schema()["function"]
    assert list(schema["parameters"]["properties"]) == ["by"]  # self is not a parameter
    assert schema["parameters"]["properties"]["by"]["description"] == "How much to add."
    box = ToolBox([bound])
    results = box.execute([call("bump", by=2), call("bump", by=3)])
    assert [r.content for r in results] == ["2", "5"] and counter.total == 5
    assert bound(10) == "15"


def test_unknown_tool_lists_available() -> None:
    res = ToolBox([add, explode]).execute([call("multiply", a=1)])[0]
    assert res.error_type is ErrorType.tool_not_found
    assert res.content == "Unknown tool 'multiply'. Available tools: add, explode"


def test_several_calls_in_order_valid_and_invalid() -> None:
    box = ToolBox([add, explode])
    calls = [call("add", a=1), call("nope"), call("add", a="x"), call("explode", message="m"), call("add", a=10)]
    results = box.execute(calls)
    assert [r.call_id for r in results] == [c.id for c in calls]
    assert [r.error_type for r in results] == [None, ErrorType.tool_not_found, ErrorType.validation_failed,
                                               ErrorType.execution_failed, None]
    assert results[0].content == "3" and results[4].content == "12"


def test_stop_episode_ends_the_batch() -> None:
    box = ToolBox([add, finish])
    calls = [call("add", a=1), call("finish", answer="42"), call("add", a=2), call("nope")]
    results = box.execute(calls)
    assert [r.call_id for r in results] == [c.id for c in calls]  # every call has exactly one result
    assert results[1].stop_episode and results[1].ok and results[1].content == "final: 42"
    assert [r.error_type for r in results[2:]] == [ErrorType.not_executed] * 2  # nothing runs after the stop
    assert results[2].content == "Not executed: an earlier call in this message ended the episode"


def test_fatal_exceptions_end_the_episode() -> None:
    box = ToolBox([explode], fatal_exceptions=[KeyError])
    res = box.execute([call("explode", message="bad")])[0]
    assert res.error_type is ErrorType.execution_failed and res.stop_episode is True
    other = ToolBox([explode], fatal_exceptions=[ValueError])
    assert other.execute([call("explode", message="x")])[0].stop_episode is False
    assert explode._fatal_exceptions == ()  # the original tool is not modified


def test_execute_from_inside_a_running_loop() -> None:
    async def main() -> str:
        return ToolBox([add]).execute([call("add", a=1)])[0].content  # sync API inside async code

    assert asyncio.run(main()) == "3"


def test_acall_directly() -> None:
    assert asyncio.run(add.acall(call("add", a=40))).content == "42"


# ---- parsers --------------------------------------------------------------------------------------
ALL_PARSERS = [HermesParser(), FencedJsonParser(), ReActParser(), Llama3JsonParser(), MistralParser()]


def test_get_parser() -> None:
    names = ["fenced_json", "hermes", "llama3_json", "mistral", "react"]
    assert isinstance(get_parser("hermes"), HermesParser) and sorted(PARSERS) == names
    with pytest.raises(ValueError, match=r"parser 'xml'; allowed: \['fenced_json', 'hermes', 'llama3_json'"):
        get_parser("xml")


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.name)
def test_format_call_round_trips_single_and_multiple(parser: ToolCallParser) -> None:
    one = parser.parse("I'll compute.\n" + parser.format_call("add", {"a": 1, "b": 2}))
    assert [(c.name, c.arguments) for c in one.calls] == [("add", {"a": 1, "b": 2})]
    assert one.errors == [] and not one.is_final
    nested = {"word": "x", "n": [1, {"k": None}]}
    many = parser.parse(parser.format_call("add", {"a": 1}) + "\n" + parser.format_call("lookup", nested))
    assert [(c.name, c.arguments) for c in many.calls] == [("add", {"a": 1}), ("lookup", nested)]
    assert many.calls[0].id != many.calls[1].id


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.name)
def test_no_call_is_final(parser: ToolCallParser) -> None:
    res = parser.parse("The answer is 391.")
    assert res.is_final and res.calls == [] and res.errors == []


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.name)
def test_random_garbage_never_raises(parser: ToolCallParser) -> None:
    rng = random.Random(0)
    alphabet = string.printable + "<>{}[]\"`:"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        res = parser.parse(text)
        assert all(isinstance(e, str) and e for e in res.errors)
    for hostile in ["<tool_call>" + "[" * 100_000 + "</tool_call>", "```tool_call\n" + "[" * 100_000 + "\n```",
                    "Action: a\nAction Input: " + "[" * 100_000, "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": "
                    + "1" * 5000 + "}}</tool_call>", "Action: a\nAction Input: {\"x\": " + "1" * 5000 + "}",
                    "{" + "[" * 100_000, "[TOOL_CALLS]" + "[" * 100_000,
                    '{"name": "a", "parameters": {"x": ' + "1" * 5000 + "}}"]:
        res = parser.parse(hostile)  # deep nesting / 5000-digit ints: a parse error or a final answer, no crash
        assert res.calls == []


def test_hermes_errors() -> None:
    p = HermesParser()
    assert p.parse('<tool_call>{"name": "a", "arguments": {</tool_call>').errors[0].startswith("invalid JSON")
    assert p.parse('<tool_call>{"name": "a", "arguments": {}}').errors == [
        "unterminated <tool_call> tag (missing </tool_call>)"]
    assert p.parse('<tool_call>{"arguments": {}}</tool_call>').errors == ['tool call is missing a string "name"']
    assert p.parse('<tool_call>{"name": "", "arguments": {}}</tool_call>').errors == [
        'tool call is missing a string "name"']
    assert p.parse('<tool_call>{"name": "a"}</tool_call>').errors == ['tool call to \'a\' is missing "arguments"']
    assert p.parse('<tool_call>{"name": "a", "arguments": [1]}</tool_call>').errors == [
        '"arguments" of \'a\' must be a JSON object, got list']
    assert p.parse("<tool_call>[1, 2]</tool_call>").errors == ["tool call must be a JSON object, got list"]
    assert p.parse("done </tool_call>").errors == ["</tool_call> without an opening <tool_call>"]


def test_hermes_arguments_as_json_string() -> None:
    res = HermesParser().parse('<tool_call>{"name": "add", "arguments": "{\\"a\\": 5}"}</tool_call>')
    assert [(c.name, c.arguments) for c in res.calls] == [("add", {"a": 5})]
    bad = HermesParser().parse('<tool_call>{"name": "add", "arguments": "a=5"}</tool_call>')
    assert bad.errors == ['"arguments" of \'add\' is a string that is not valid JSON']


def test_hermes_valid_calls_survive_a_bad_one() -> None:
    p = HermesParser()
    text = p.format_call("a", {}) + "<tool_call>{oops}</tool_call>" + p.format_call("b", {"x": 1})
    res = p.parse(text)
    assert [c.name for c in res.calls] == ["a", "b"] and len(res.errors) == 1 and not res.is_final


def test_fenced_json_errors_and_other_fences() -> None:
    p = FencedJsonParser()
    assert p.parse("```python\nprint(1)\n```").is_final  # an ordinary code block is not a call
    assert p.parse('```tool_call\n{"name": "a", "arguments": {}}\n').errors == [
        "unterminated ```tool_call block (missing closing ```)"]
    assert p.parse('```tool_call\n{"name": "a", "arguments": \n```').errors[0].startswith("invalid JSON")
    assert p.parse('```tool_call\n{"arguments": {}}\n```').errors == ['tool call is missing a string "name"']
    assert p.parse('```tool_call\n{"name": "a"}\n```').errors == ['tool call to \'a\' is missing "arguments"']
    res = p.parse('```tool_call\n{"name": "a", "arguments": "{\\"k\\": 1}"}\n```')
    assert res.calls[0].arguments == {"k": 1}


def test_react_errors_and_final_answer() -> None:
    p = ReActParser()
    assert p.parse("Thought: easy.\nFinal Answer: 391").is_final
    assert p.parse("Action: add").errors == ["Action 'add' has no 'Action Input:' line"]
    assert p.parse("Action:\nAction Input: {}").errors == ["Action: line without a tool name"]
    assert p.parse('Action: add\nAction Input: {"a": 1').errors == [
        '"arguments" of \'add\' is a string that is not valid JSON']
    assert p.parse("Action: add\nAction Input: [1]").errors == [
        '"arguments" of \'add\' must be a JSON object, got list']
    res = p.parse('Action: add\nAction Input: "{\\"a\\": 1}"\nObservation:')
    assert [(c.name, c.arguments) for c in res.calls] == [("add", {"a": 1})]


def test_llama3_json_calls_and_errors() -> None:
    p = Llama3JsonParser()
    res = p.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "b", "arguments": {}}')
    assert [(c.name, c.arguments) for c in res.calls] == [("add", {"a": 1}), ("b", {})] and res.errors == []
    assert p.parse('The answer is {"x": 1}').is_final  # JSON inside a line is not a call
    res = p.parse('Step 1.\n  {"name": "add", "parameters": {"a": 1}}')  # a reasoning line may come first
    assert [c.name for c in res.calls] == ["add"] and res.errors == []
    assert p.parse('{"name": "a", "parameters": {').errors[0].startswith("invalid JSON")
    assert p.parse('{"name": "a"}').errors == ['tool call to \'a\' is missing "arguments"']
    assert p.parse('{"name": "a", "parameters": {}} trailing').errors[0].startswith("invalid JSON")
    assert p.stop_strings == ()


def test_mistral_calls_and_errors() -> None:
    p = MistralParser()
    res = p.parse('Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "b", "arguments": {}}]')
    assert [(c.name, c.arguments) for c in res.calls] == [("add", {"a": 1}), ("b", {})] and res.errors == []
    assert p.parse("[TOOL_CALLS]").errors == ["[TOOL_CALLS] without a json list of calls"]
    assert p.parse("[TOOL_CALLS][{").errors[0].startswith("invalid JSON")
    assert p.parse('[TOOL_CALLS][{"arguments": {}}]').errors == ['tool call is missing a string "name"']
    assert p.parse("No tools needed: 4.").is_final and p.stop_strings == ()


def test_react_multiline_input_stops_at_next_marker() -> None:
    text = 'Thought: t\nAction: add\nAction Input: {\n  "a": 1\n}\nObservation: 3\nAction: add\nAction Input: {"a": 2}'
    res = ReActParser().parse(text)
    assert [c.arguments for c in res.calls] == [{"a": 1}, {"a": 2}] and res.errors == []


# Inputs that make a careless pattern rescan the text (blank runs after an opener, unterminated tags). The env
# caps messages at 64k characters, but the parsers take any length, so their time must grow linearly.
SCALING_INPUTS = {
    "hermes": [lambda n: "<tool_call>" * (n // 11), lambda n: "<tool_call>" + " \n" * (n // 2) + "</tool_call>"],
    "fenced_json": [lambda n: "```tool_call" + "\n" * n, lambda n: "```tool_call" + " " * n,
                    lambda n: "x ```tool_call " * (n // 15)],
    "react": [lambda n: "Action: add\nAction Input: x" + "\n" * n, lambda n: "Action: add\n" + " \n" * (n // 2),
              lambda n: "Action: add\nAction Input: {" + " \t\n" * (n // 3)],
    "llama3_json": [lambda n: "{" + " \n" * (n // 2), lambda n: '{"x"' + " ; " * (n // 3),
                    lambda n: "<|python_tag|>" + " \n" * (n // 2) + "{"],
    "mistral": [lambda n: "[TOOL_CALLS]" * (n // 12), lambda n: "[TOOL_CALLS][" + " \n" * (n // 2)],
}


@pytest.mark.parametrize("name", sorted(SCALING_INPUTS))
def test_parsers_are_linear_time(name: str) -> None:
    parser = get_parser(name)

    def seconds(n: int) -> float:  # best of 3 over all inputs: robust to a busy machine
        texts = [make(n) for make in SCALING_INPUTS[name]]
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for text in texts:
                assert parser.parse(text).calls == []
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(1_000_000), seconds(4_000_000)
    assert large / max(small, 1e-3) < 8  # 4x the input: linear ~4x, quadratic 16x (it was minutes on 20k lines)


def test_stop_strings() -> None:
    assert HermesParser.stop_strings == ("</tool_call>",)
    assert ReActParser.stop_strings == ("Observation:",)
