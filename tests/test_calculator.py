"""The calculator tool: exact values, precedence, refusal of anything but arithmetic, bounded results."""

from __future__ import annotations

import time

import pytest

from opd_agents.env.tool import ToolBox
from opd_agents.types import ErrorType, ToolCall, ToolResult
from tools.calculator import calculator, evaluate, format_number


def run(expression: object) -> ToolResult:
    return ToolBox([calculator]).execute([ToolCall(name="calculator", arguments={"expression": expression})])[0]


@pytest.mark.parametrize(("expression", "expected"), [
    ("17*23 + 4*139", "947"),
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("2 ** 3 ** 2", "512"),  # right-associative, as in Python
    ("-2 ** 2", "-4"),  # unary minus binds looser than **
    ("10 / 4", "2.5"),
    ("10 / 2", "5"),  # divisible ints stay ints: no "5.0"
    ("7 // 2", "3"),
    ("-7 % 3", "2"),
    ("2 ** -2", "0.25"),
    ("0.1 + 0.2", "0.3"),  # 10 significant digits hide float noise
    ("1 / 3", "0.3333333333"),
    ("123456789012345678 * 10 / 2", "617283945061728390"),  # exact for big ints
    ("sqrt(16)", "4"),
    ("abs(-4.5)", "4.5"),
    ("round(2.567, 2)", "2.57"),
    ("min(3, 9, 2) + max(3, 9, 2)", "11"),
    ("+5 - -3", "8"),
    ("1e20", "1e+20"),
])
def test_values(expression: str, expected: str) -> None:
    result = run(expression)
    assert result.error_type is None, result.content
    assert result.content == expected


@pytest.mark.parametrize(("expression", "detail"), [
    ("__import__('os').system('ls')", "only these functions"),
    ("open('/etc/passwd')", "only these functions"),
    ("x + 1", "unknown name 'x'"),
    ("(1).__class__", "Attribute is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("[i for i in range(9)]", "ListComp is not allowed"),
    ("'a' * 3", "only numbers are allowed"),
    ("True + 1", "only numbers are allowed"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("sqrt(x=4)", "positional arguments"),
    ("1,234 + 1", "thousands separators"),
    ("2 ^ 3", "use **"),
    ("3 & 1", "not supported"),
    ("(-8) ** 0.5", "not a real number"),
    ("17 *", "invalid expression"),
])
def test_rejects_non_arithmetic(expression: str, detail: str) -> None:
    result = run(expression)
    assert result.error_type is ErrorType.execution_failed
    assert result.content.startswith("Tool execution failed: ValueError:")
    assert detail in result.content


@pytest.mark.parametrize("expression", ["9**9**9", "2**100000000", "10**101", "2.0**5000", "1e308*10", "1e999"])
def test_huge_results_are_refused_quickly(expression: str) -> None:
    start = time.perf_counter()
    result = run(expression)
    assert result.error_type is ErrorType.execution_failed
    assert "ValueError" in result.content and ("too large" in result.content or "finite" in result.content)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("expression", "detail"), [
    ("round(1, -10**9)", "|n| <= 100"),  # computed 10**(10**9) under the GIL: froze the process > 90 s
    ("round(1, -10**7)", "|n| <= 100"),
    ("round(10**100, 10**9)", "|n| <= 100"),
    ("10**10**10", "too large"),
    ("9**9**9", "too large"),
    ("(-9)**9**9", "too large"),
    ("1.5**10**10", "too large"),
    ("0.5**-10**10", "too large"),
    ("1 << 10**9", "not supported"),
    ("1 >> 10**9", "not supported"),
    ("10**10**10 % 7", "too large"),
    ("(10**100 * 10**100) % 7", "too large"),
    ("(10**100 + 10**100) // 3", "too large"),
    ("sqrt(10**10**10)", "too large"),
    ("abs(-(10**10**10))", "too large"),
    ("max(" + ",".join(["9**9**9"] * 30) + ")", "too large"),
    ("(" * 150 + "1" + ")" * 149, "invalid expression"),
    ("-" * 299 + "1", None),  # deep but cheap: a value, not a crash
    ("-max(" + ",".join(["1"] * 147) + ")", None),  # as many arguments as fit: cheap
    ("2**" * 99 + "2", "too large"),
])
def test_costly_operations_are_refused_before_they_run(expression: str, detail: str | None) -> None:
    start = time.perf_counter()
    result = run(expression)
    assert time.perf_counter() - start < 1.0  # microseconds in fact; the bound is for loaded CI machines
    if detail is None:
        assert result.ok and result.content == "-1"
    else:
        assert result.error_type is ErrorType.execution_failed and detail in result.content, result.content


def test_round_digits_within_the_bound_still_work() -> None:
    assert run("round(123456, -3)").content == "123000" and run("round(1.23456, 100)").content == "1.23456"
    assert run("round(10**100, -100)").content == "1" + "0" * 100


def test_overlong_expression_is_refused() -> None:
    result = run("+".join(["1"] * 200))
    assert result.error_type is ErrorType.execution_failed
    assert "longer than 300 characters" in result.content


@pytest.mark.parametrize("expression", ["1 / 0", "5 // 0", "5 % 0", "0 ** -1"])
def test_division_by_zero_is_execution_failed(expression: str) -> None:
    result = run(expression)
    assert result.error_type is ErrorType.execution_failed
    assert "ZeroDivisionError" in result.content


def test_bad_arguments_are_validation_failed() -> None:
    box = ToolBox([calculator])
    missing, wrong_type, extra = box.execute([
        ToolCall(name="calculator", arguments={}),
        ToolCall(name="calculator", arguments={"expression": ["1+1"]}),
        ToolCall(name="calculator", arguments={"expression": "1+1", "precision": 3}),
    ])
    assert [r.error_type for r in (missing, wrong_type, extra)] == [ErrorType.validation_failed] * 3
    assert "expression" in missing.content and "precision" in extra.content


def test_schema_and_helpers() -> None:
    fn = calculator.schema()["function"]
    assert fn["name"] == "calculator"
    assert fn["parameters"]["required"] == ["expression"]
    assert "sqrt" in fn["description"]
    assert evaluate("6*7") == 42 and isinstance(evaluate("6*7"), int)
    assert format_number(5.0) == "5" and format_number(2.5) == "2.5" and format_number(-3) == "-3"
