"""PythonMath: number problems whose answer needs a program (primes, big powers, Fibonacci mod m...),
solved with the sandboxed ``python`` tool. Same prompt, grading and expert conventions as Arithmetic.

Each template has its own answer function (computed here, in-process) and, independently, the program
the scripted expert runs in the sandbox; the expert tests check that the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import numpy as np

from environments.arithmetic import Draw, expert_answer, expert_turn, grade_number, is_plain_number, tool_outputs
from opd_agents.env.core import EnvLimits, Task, ToolEnv
from opd_agents.errors import ConfigError
from opd_agents.env.parsers import ToolCallParser
from opd_agents.env.tool import Tool
from opd_agents.types import Message
from tools.python_exec import SandboxMode, make_python_tool, require_sandbox


@dataclass(frozen=True)
class Problem:
    question: str
    code: str  # what the expert runs; prints only the answer
    answer: int


def _primes_below(n: int) -> list[int]:
    sieve = bytearray([1]) * n
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(n - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return [i for i, is_prime in enumerate(sieve) if is_prime]


_SIEVE = """\
n = {n}
is_prime = [True] * n
is_prime[0] = is_prime[1] = False
for i in range(2, int(n ** 0.5) + 1):
    if is_prime[i]:
        for j in range(i * i, n, i):
            is_prime[j] = False
"""


def p_prime_sum(d: Draw) -> Problem:
    n = d.int(1000, 50000)
    return Problem(f"What is the sum of all prime numbers below {n}?",
                   _SIEVE.format(n=n) + "print(sum(i for i in range(n) if is_prime[i]))", sum(_primes_below(n)))


def p_prime_count(d: Draw) -> Problem:
    a = d.int(1000, 20000)
    b = a + d.int(1000, 30000)
    answer = sum(1 for p in _primes_below(b + 1) if p >= a)
    return Problem(f"How many prime numbers are there between {a} and {b}, inclusive?",
                   _SIEVE.format(n=b + 1) + f"print(sum(1 for i in range({a}, {b + 1}) if is_prime[i]))", answer)


def p_power_digit(d: Draw) -> Problem:
    base, exp, k = d.int(2, 9), d.int(100, 400), d.int(5, 30)
    return Problem(f"What is the {_ordinal(k)} digit (counting from the left) of {base}**{exp}?",
                   f"print(str({base} ** {exp})[{k - 1}])", int(str(base**exp)[k - 1]))


def p_divisible(d: Draw) -> Problem:
    a, b = d.int(100, 999), d.int(5000, 99999)
    k = d.int(3, 19)
    m = d.int(4, 29)
    while m == k or m % k == 0:  # "divisible by k but not m" must leave something to count
        m = d.int(4, 29)
    answer = sum(1 for x in range(a, b + 1) if x % k == 0 and x % m != 0)
    return Problem(f"How many integers from {a} to {b} (inclusive) are divisible by {k} but not by {m}?",
                   f"print(sum(1 for x in range({a}, {b + 1}) if x % {k} == 0 and x % {m} != 0))", answer)


def p_fibonacci_mod(d: Draw) -> Problem:
    n, m = d.int(100, 5000), d.int(1000, 99999)
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    code = f"a, b = 0, 1\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a % {m})"
    return Problem(f"Let F(1) = F(2) = 1 and F(k) = F(k-1) + F(k-2). What is F({n}) mod {m}?", code, a % m)


def p_gcd(d: Draw) -> Problem:
    g = d.int(101, 9999)
    x, y = d.int(1000, 99999), d.int(1000, 99999)
    a, b = g * x, g * y
    return Problem(f"What is the greatest common divisor of {a} and {b}?",
                   f"import math\nprint(math.gcd({a}, {b}))", math.gcd(a, b))


def p_lcm(d: Draw) -> Problem:
    nums = [d.int(100, 999) for _ in range(3)]
    answer = math.lcm(*nums)
    return Problem(f"What is the least common multiple of {nums[0]}, {nums[1]} and {nums[2]}?",
                   f"import math\nprint(math.lcm({nums[0]}, {nums[1]}, {nums[2]}))", answer)


def p_factorial_digit_sum(d: Draw) -> Problem:
    n = d.int(50, 300)
    return Problem(f"What is the sum of the decimal digits of {n}! ({n} factorial)?",
                   f"import math\nprint(sum(int(c) for c in str(math.factorial({n}))))",
                   sum(int(c) for c in str(math.factorial(n))))


def p_power_mod(d: Draw) -> Problem:
    base, exp, mod = d.int(2, 999), d.int(10**5, 10**9), d.int(1000, 99999)
    return Problem(f"What is {base}**{exp} mod {mod}?", f"print(pow({base}, {exp}, {mod}))", pow(base, exp, mod))


def p_divisor_count(d: Draw) -> Problem:
    n = d.int(10**5, 10**7)
    answer = math.prod(e + 1 for e in _factor_exponents(n))
    code = (f"n = {n}\ncount = 0\ni = 1\nwhile i * i <= n:\n    if n % i == 0:\n"
            "        count += 1 if i * i == n else 2\n    i += 1\nprint(count)")
    return Problem(f"How many positive divisors does {n} have?", code, answer)


def _factor_exponents(n: int) -> list[int]:
    exps, p = [], 2
    while p * p <= n:
        e = 0
        while n % p == 0:
            n, e = n // p, e + 1
        if e:
            exps.append(e)
        p += 1
    return exps + ([1] if n > 1 else [])


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


TEMPLATES: tuple[Callable[[Draw], Problem], ...] = (
    p_prime_sum, p_prime_count, p_power_digit, p_divisible, p_fibonacci_mod, p_gcd, p_lcm,
    p_factorial_digit_sum, p_power_mod, p_divisor_count,
)

PROMPT = (
    "Solve the problem below by writing Python code for the python tool (print the values you need; "
    "only the standard library is available). Do not guess: compute.\n"
    "When you have the result, reply without a tool call, ending with the line\n"
    "Answer: <number>\n\n"
    "Problem: {problem}"
)


class PythonMathEnv(ToolEnv):
    """Number problems that need computation, solved with the sandboxed ``python`` tool."""

    tools: ClassVar[list[Tool]] = [make_python_tool()]
    system_prompt: ClassVar[str] = (
        "You are a careful assistant that solves math problems by writing and running Python code with the "
        "python tool. Run code for every computation and read its output before answering."
    )

    def __init__(self, sandbox: SandboxMode = "os", parser: str | ToolCallParser = "hermes",
                 limits: EnvLimits | dict[str, Any] | None = None, render_mode: str | None = None) -> None:
        """``sandbox="os"`` (default) refuses to start on a host without the OS sandbox; ``"unsafe"`` runs
        model code without it (trusted code only)."""
        if sandbox not in get_args(SandboxMode):
            raise ConfigError(f"sandbox must be one of {list(get_args(SandboxMode))}, got {sandbox!r}")
        require_sandbox(sandbox)  # before any work: a host without the sandbox fails here, not mid-run
        self.sandbox = sandbox
        super().__init__(parser=parser, limits=limits, render_mode=render_mode)

    def bound_tools(self) -> list[Tool]:
        return [make_python_tool(sandbox=self.sandbox)]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        problem = template(Draw(rng))
        reference = (f"Worked solution: run this program with the python tool\n```python\n{problem.code}\n```\n"
                     f"It prints {problem.answer}.\nAnswer: {problem.answer}")
        return Task(
            id=f"python_math-{seed}", seed=seed, split=split, prompt=PROMPT.format(problem=problem.question),
            answer=problem.answer, reference=reference,
            data={"template": template.__name__, "question": problem.question, "code": problem.code},
        )

    def grade(self, task: Task, answer: str) -> float:
        return grade_number(answer, task.answer)

    def expert_action(self, task: Task, history: list[Message]) -> str:
        """One python call that prints the answer, then the answer read from its output."""
        outputs = [o for o in tool_outputs(history, "python") if is_plain_number(o)]
        if not outputs:
            call = self.parser.format_call("python", {"code": task.data["code"]})
            return expert_turn(self.parser, "I will compute this with a short program.", call)
        value = outputs[-1].strip()
        return expert_answer(self.parser, f"The program printed {value}.", value)
