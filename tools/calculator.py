"""The ``calculator`` tool: exact arithmetic through a whitelisting ``ast`` walker (never ``eval``).

Integers stay exact (``/`` of divisible ints gives an int). Every operation's cost is bounded *before* it
runs: operands are at most 1e100 (checked after every step), powers are size-checked from logarithms and
``round`` digits are limited, so ``9**9**9`` or ``round(1, -10**9)`` is refused in microseconds instead of
freezing the process (a big-int power holds the GIL, so no timeout can interrupt it).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from opd_agents.env.tool import tool

MAX_EXPRESSION_CHARS = 300
MAX_ABS_RESULT = 10**100
MAX_ROUND_DIGITS = 100  # round(1, -n) computes 10**n: unbounded n would freeze like a huge power
SIGNIFICANT_DIGITS = 10

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max,
}


def _check(value: Number) -> Number:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    if abs(value) > MAX_ABS_RESULT:
        raise ValueError("the result is too large (limit 1e100)")
    return value


def _divide(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
        return a // b  # exact: 10/2 -> 5, not 5.0 (and no float rounding for big ints)
    return a / b


def _power(base: Number, exp: Number) -> Number:
    # Bound the size before computing: 2**10**9 would take minutes and gigabytes.
    if abs(base) > 1 and exp > 0 and exp * math.log10(abs(base)) > math.log10(MAX_ABS_RESULT):
        raise ValueError("the result is too large (limit 1e100)")
    try:
        return base**exp
    except OverflowError:
        raise ValueError("the result is too large (limit 1e100)") from None


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"only numbers are allowed, got {node.value!r}")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        # Both operands are <= 1e100 here, so + - * // % cost microseconds; only ** needs a check first.
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div):
            return _check(_divide(left, right))
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        if isinstance(node.op, ast.BitXor):
            raise ValueError("'^' is not a power here; use ** (e.g. 2**10)")
        fn = _BINARY.get(type(node.op))
        if fn is None:
            raise ValueError(f"operator {type(node.op).__name__} is not supported; use + - * / // % **")
        return _check(fn(left, right))
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords or not node.args:
            allowed = ", ".join(_FUNCTIONS)
            raise ValueError(f"only these functions can be called (with positional arguments): {allowed}")
        args = [_eval(a) for a in node.args]
        if name == "round" and len(args) == 2:
            if not isinstance(args[1], int):
                raise ValueError("round(x, n) needs an integer n")
            if abs(args[1]) > MAX_ROUND_DIGITS:
                raise ValueError(f"round(x, n) needs |n| <= {MAX_ROUND_DIGITS}")
        return _check(_FUNCTIONS[name](*args))
    if isinstance(node, ast.Tuple):
        raise ValueError("write numbers without thousands separators (1234, not 1,234)")
    if isinstance(node, ast.Name):
        raise ValueError(f"unknown name {node.id!r}: only numbers, operators and {', '.join(_FUNCTIONS)}")
    raise ValueError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> Number:
    """Value of an arithmetic expression (ValueError / ZeroDivisionError on bad input)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid expression: {e.msg}") from None
    return _eval(tree)


def format_number(value: Number) -> str:
    """Integers without ".0"; floats to 10 significant digits (0.1+0.2 -> 0.3)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{SIGNIFICANT_DIGITS}g}"


@tool(timeout_s=5.0)
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Supports + - * / // % ** (power), parentheses, and sqrt, abs, round, min, max.

    Args:
        expression: The expression, e.g. "17*23 + 4*139".
    """
    return format_number(evaluate(expression))
