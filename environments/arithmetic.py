"""Arithmetic: multi-step word problems (shopping, trips, stock...) solved with the ``calculator`` tool.

Each problem is a chain of 1-4 operations on 2-3 digit numbers (``difficulty`` = number of operations),
generated from the task seed: too much for a 135M model to do in its head, easy with the tool.
The grading and expert helpers here are shared with ``python_math``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from opd_agents.env.core import EnvLimits, Task, ToolEnv
from opd_agents.errors import ConfigError
from opd_agents.env.parsers import ToolCallParser
from opd_agents.env.tool import Tool
from opd_agents.types import Message
from tools.calculator import calculator, evaluate, format_number

# ---- grading and expert helpers (shared by the numeric envs) -----------------------------------------
_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
ANSWER_TOLERANCE = Fraction(1, 10**6)


def extract_number(text: str) -> Fraction | None:
    """The first number after the last "Answer:" (also "Final Answer:"); without one, the last number."""
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        match = _NUMBER.search(text, marks[-1].end())
    else:
        found = list(_NUMBER.finditer(text))
        match = found[-1] if found else None
    if match is None:
        return None
    try:
        return Fraction(match.group().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def grade_number(text: str, answer: int | float | str) -> float:
    """1.0 if the extracted number equals ``answer`` within 1e-6 (exact for big ints), else 0.0."""
    value = extract_number(text)
    if value is None:
        return 0.0
    return 1.0 if abs(value - Fraction(answer)) <= ANSWER_TOLERANCE else 0.0


def is_plain_number(text: str) -> bool:
    """A tool output that is just a number (a result, not an error message that happens to hold digits)."""
    return _NUMBER.fullmatch(text.strip()) is not None


def expert_turn(parser: ToolCallParser, thought: str, call: str) -> str:
    """One expert message: a short reasoning line, then the call in the env's format."""
    return f"Thought: {thought}\n{call}" if parser.name == "react" else f"{thought}\n{call}"


def expert_answer(parser: ToolCallParser, thought: str, answer: str) -> str:
    """The expert's final message, in the form the prompt asks for (ReAct's is "Final Answer:")."""
    if parser.name == "react":
        return f"Thought: {thought}\nFinal Answer: {answer}"
    return f"{thought}\nAnswer: {answer}"


def tool_outputs(history: list[Message], tool_name: str) -> list[str]:
    return [m.content for m in history if m.role == "tool" and m.name == tool_name]


# ---- problem templates -------------------------------------------------------------------------------
NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jun", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
ITEMS = ("pens", "notebooks", "mugs", "lamps", "chairs", "shirts", "books", "plates", "candles", "bottles",
         "towels", "puzzles")


@dataclass
class Steps:
    """The calculator expressions of a solution, each evaluated by the calculator's own evaluator."""

    descriptions: list[str] = field(default_factory=list)
    expressions: list[str] = field(default_factory=list)
    values: list[int] = field(default_factory=list)

    def op(self, description: str, a: int, symbol: str, b: int) -> int:
        expression = f"{a}{symbol}{b}"
        value = evaluate(expression)
        if not isinstance(value, int) or value < 0:  # templates are built to stay in non-negative ints
            raise AssertionError(f"template produced {expression} = {value}")
        self.descriptions.append(description)
        self.expressions.append(expression)
        self.values.append(value)
        return value


class Draw:
    """Random choices of one task (plain ints/strs, so task data stays JSON-friendly)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def int(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def two(self, options: tuple[str, ...]) -> tuple[str, str]:
        i, j = self.rng.choice(len(options), size=2, replace=False)
        return options[int(i)], options[int(j)]


Template = Callable[[Draw, Steps], str]  # fills the steps, returns the problem text


def t_boxes(d: Draw, s: Steps) -> str:
    a, b, item = d.int(12, 99), d.int(12, 99), d.pick(ITEMS)
    s.op(f"number of {item}", a, "*", b)
    return f"A warehouse has {a} boxes with {b} {item} in each box. How many {item} are in the warehouse?"


def t_wages(d: Draw, s: Steps) -> str:
    name, w, days = d.pick(NAMES), d.int(105, 499), d.int(12, 60)
    s.op("total pay", w, "*", days)
    return f"{name} earns ${w} a day. How many dollars does {name} earn in {days} days?"


def t_library(d: Draw, s: Steps) -> str:
    a, b = d.int(1200, 9999), d.int(123, 999)
    s.op("number of books left", a, "-", b)
    return f"A library has {a} books and lends out {b} of them. How many books are still in the library?"


def t_change(d: Draw, s: Steps) -> str:
    name, item, a, p = d.pick(NAMES), d.pick(ITEMS), d.int(12, 48), d.int(13, 99)
    cost = s.op(f"cost of the {item}", a, "*", p)
    pay = (cost // 100 + d.int(1, 5)) * 100
    s.op("change", pay, "-", cost)
    return f"{name} buys {a} {item} at ${p} each and pays with ${pay}. How many dollars of change does {name} get?"


def t_orchard(d: Draw, s: Steps) -> str:
    rows, per_row = d.int(12, 60), d.int(12, 60)
    trees = s.op("number of trees", rows, "*", per_row)
    cut = d.int(11, trees // 3)
    s.op("number of trees still standing", trees, "-", cut)
    return (f"An orchard has {rows} rows of {per_row} trees. A storm knocks down {cut} trees. "
            "How many trees are still standing?")


def t_share(d: Draw, s: Steps) -> str:
    name, item, shops, b = d.pick(NAMES), d.pick(ITEMS), d.int(3, 12), d.int(12, 99)
    crates = shops * d.int(4, 30)  # a multiple of the shop count, so the share is a whole number
    total = s.op(f"number of {item}", crates, "*", b)
    s.op(f"{item} per shop", total, "/", shops)
    return (f"{name} packs {crates} crates with {b} {item} in each crate and shares them equally among {shops} "
            f"shops. How many {item} does each shop get?")


def _two_item_purchase(d: Draw, s: Steps) -> tuple[str, str, int]:
    """Two items bought in bulk: (buyer, the purchase sentence without its end, total cost step)."""
    name, (item1, item2) = d.pick(NAMES), d.two(ITEMS)
    a, p, b, q = d.int(12, 48), d.int(13, 99), d.int(3, 29), d.int(105, 499)
    c1 = s.op(f"cost of the {item1}", a, "*", p)
    c2 = s.op(f"cost of the {item2}", b, "*", q)
    total = s.op("total cost", c1, "+", c2)
    return name, f"{name} buys {a} {item1} at ${p} each and {b} {item2} at ${q} each", total


def t_total(d: Draw, s: Steps) -> str:
    name, bought, _ = _two_item_purchase(d, s)
    return f"{bought}. How many dollars does {name} spend in total?"


def t_trip(d: Draw, s: Steps) -> str:
    s1, h1, s2, h2 = d.int(45, 180), d.int(2, 14), d.int(45, 180), d.int(2, 14)
    d1 = s.op("distance of the first part", s1, "*", h1)
    d2 = s.op("distance of the second part", s2, "*", h2)
    s.op("total distance", d1, "+", d2)
    return (f"A train travels at {s1} km/h for {h1} hours, then at {s2} km/h for {h2} hours. "
            "How many kilometres does it travel in total?")


def t_bakery(d: Draw, s: Steps) -> str:
    trays, per_tray, days = d.int(5, 30), d.int(12, 48), d.int(3, 14)
    daily = s.op("cookies baked per day", trays, "*", per_tray)
    baked = s.op("cookies baked in total", daily, "*", days)
    sold = d.int(baked // 3, baked - 1)
    s.op("cookies left", baked, "-", sold)
    return (f"A bakery bakes {trays} trays of {per_tray} cookies every day. After {days} days it has sold "
            f"{sold} cookies. How many cookies are left?")


def t_change_two(d: Draw, s: Steps) -> str:
    name, bought, total = _two_item_purchase(d, s)
    pay = (total // 1000 + d.int(1, 3)) * 1000
    s.op("change", pay, "-", total)
    return f"{bought}, and pays with ${pay}. How many dollars of change does {name} get?"


def t_stores(d: Draw, s: Steps) -> str:
    item, stores = d.pick(ITEMS), d.int(3, 15)
    a, b, c, e = stores * d.int(2, 9), d.int(12, 99), stores * d.int(2, 9), d.int(12, 99)  # divisible total
    n1 = s.op(f"{item} in the large crates", a, "*", b)
    n2 = s.op(f"{item} in the small crates", c, "*", e)
    total = s.op(f"total number of {item}", n1, "+", n2)
    s.op(f"{item} per store", total, "/", stores)
    return (f"A factory packs {a} large crates of {b} {item} and {c} small crates of {e} {item}, and ships "
            f"all of them equally to {stores} stores. How many {item} does each store get?")


def t_savings(d: Draw, s: Steps) -> str:
    name, wage, hours, weeks, bonus = d.pick(NAMES), d.int(12, 45), d.int(20, 45), d.int(6, 52), d.int(100, 999)
    pay = s.op("weekly pay", wage, "*", hours)
    rent = d.int(100, pay - 50)
    saved = s.op("weekly savings", pay, "-", rent)
    over_weeks = s.op(f"savings over {weeks} weeks", saved, "*", weeks)
    s.op("money saved", over_weeks, "+", bonus)
    return (f"{name} earns ${wage} per hour and works {hours} hours a week. Rent costs ${rent} a week and "
            f"everything else is saved. {name} also gets a one-time bonus of ${bonus}. Starting from zero, "
            f"how many dollars has {name} saved after {weeks} weeks?")


TEMPLATES: dict[int, tuple[Template, ...]] = {  # number of operations -> templates
    1: (t_boxes, t_wages, t_library),
    2: (t_change, t_orchard, t_share),
    3: (t_total, t_trip, t_bakery),
    4: (t_change_two, t_stores, t_savings),
}

PROMPT = (
    "Solve the word problem below. Do every arithmetic step with the calculator tool instead of in your "
    "head (one operation per call is fine) and use the results it returns.\n"
    "When you have the result, reply without a tool call, ending with the line\n"
    "Answer: <number>\n\n"
    "Problem: {problem}"
)


class ArithmeticEnv(ToolEnv):
    """Word problems needing ``difficulty`` (1-4) calculator operations."""

    tools: ClassVar[list[Tool]] = [calculator]
    system_prompt: ClassVar[str] = (
        "You are a careful assistant that solves math word problems with a calculator tool. "
        "Call the calculator for every computation and read its result before going on."
    )

    def __init__(self, difficulty: int = 2, parser: str | ToolCallParser = "hermes",
                 limits: EnvLimits | dict[str, Any] | None = None, render_mode: str | None = None) -> None:
        if difficulty not in TEMPLATES:
            raise ConfigError(f"difficulty must be one of {sorted(TEMPLATES)} (operations), got {difficulty!r}")
        self.difficulty = difficulty
        super().__init__(parser=parser, limits=limits, render_mode=render_mode)

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        draw, steps = Draw(rng), Steps()
        templates = TEMPLATES[self.difficulty]
        template = templates[int(rng.integers(len(templates)))]
        problem = template(draw, steps)
        answer = steps.values[-1]
        solution = zip(steps.descriptions, steps.expressions, steps.values, strict=True)
        lines = [f'{i}. {desc}: calculator("{expr}") = {format_number(value)}'
                 for i, (desc, expr, value) in enumerate(solution, 1)]
        reference = "Worked solution (calculator calls in order):\n" + "\n".join(lines) + f"\nAnswer: {answer}"
        return Task(
            id=f"arithmetic-d{self.difficulty}-{seed}", seed=seed, split=split,
            prompt=PROMPT.format(problem=problem), answer=answer, reference=reference,
            data={"template": template.__name__, "difficulty": self.difficulty, "problem": problem,
                  "descriptions": steps.descriptions, "expressions": steps.expressions, "values": steps.values},
        )

    def grade(self, task: Task, answer: str) -> float:
        return grade_number(answer, task.answer)

    def expert_action(self, task: Task, history: list[Message]) -> str:
        """One calculator call per step (in order), then the answer read from the last result."""
        results = [r for r in tool_outputs(history, "calculator") if is_plain_number(r)]
        k = len(results)
        descriptions, expressions = task.data["descriptions"], task.data["expressions"]
        if k < len(expressions):
            call = self.parser.format_call("calculator", {"expression": expressions[k]})
            return expert_turn(self.parser, f"Step {k + 1}: the {descriptions[k]} is {expressions[k]}.", call)
        value = results[-1].strip()
        return expert_answer(self.parser, f"The {descriptions[-1]} is {value}.", value)
