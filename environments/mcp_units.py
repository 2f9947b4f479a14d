"""MCPUnits: unit conversions answered with the tools of an MCP server (``tools/mcp_units_server.py``,
started over stdio per env; pass ``server="http://..."`` to use one already running).

The shape of any env built on ``MCPToolEnv``: a server, tasks, a grader, and optionally an expert.
Needs the ``mcp`` extra: ``pip install 'opd-agents[mcp]'``.
"""

from __future__ import annotations

import numpy as np

from environments.arithmetic import expert_answer, expert_turn, extract_number, is_plain_number, tool_outputs
from opd_agents.env.adapters.mcp import MCPToolEnv
from opd_agents.env.core import Task
from opd_agents.types import Message
from tools.mcp_units_server import UNITS, convert_value

RELATIVE_TOLERANCE = 1e-4  # the tool answers to 6 significant digits; a copied answer may drop some


class UnitsMCPEnv(MCPToolEnv):
    """Convert a quantity between units with an MCP server's convert tool (one call, then the answer)."""

    server = ["python", "-m", "tools.mcp_units_server"]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        kind = str(rng.choice(sorted({k for k, _ in UNITS.values()})))
        units = sorted(u for u, (k, _) in UNITS.items() if k == kind)
        from_unit, to_unit = (str(u) for u in rng.choice(units, size=2, replace=False))
        value = round(float(rng.uniform(-40, 100) if kind == "temperature" else rng.uniform(0.5, 500)), 2)
        answer = convert_value(value, from_unit, to_unit)
        return Task(id=f"mcp-units-{seed}", seed=seed, split=split, answer=answer,
                    prompt=f"Convert {value} {from_unit} to {to_unit}. Finish with 'Answer: <number>'.",
                    reference=f"{value} {from_unit} = {answer} {to_unit}",
                    data={"value": value, "from_unit": from_unit, "to_unit": to_unit})

    def grade(self, task: Task, answer: str) -> float:
        value = extract_number(answer)
        if value is None:
            return 0.0
        return float(abs(float(value) - task.answer) <= RELATIVE_TOLERANCE * max(abs(task.answer), 1e-9))

    def expert_action(self, task: Task, history: list[Message]) -> str:
        results = [r for r in tool_outputs(history, "convert") if is_plain_number(r)]
        if not results:
            call = self.parser.format_call("convert", dict(task.data))
            return expert_turn(self.parser, "The convert tool does this exactly.", call)
        return expert_answer(self.parser, f"The tool says {results[-1].strip()}.", results[-1].strip())
