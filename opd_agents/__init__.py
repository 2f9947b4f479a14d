"""opd-agents: on-policy distillation of small tool-using agent models."""

from opd_agents.env.core import EnvLimits, Task, TextSpace, ToolEnv, heldout_seeds, split_of_seed
from opd_agents.errors import OpdError
from opd_agents.env.tool import StopEpisode, Tool, ToolBox, tool
from opd_agents.types import ErrorType, Message, StopReason, ToolCall, ToolResult, Trajectory, Turn, TurnOutcome

__version__ = "0.1.0"

__all__ = [
    "EnvLimits", "ErrorType", "Message", "OpdError", "StopEpisode", "StopReason", "Task", "TextSpace",
    "Tool", "ToolBox", "ToolCall", "ToolEnv", "ToolResult", "Trajectory", "Turn", "TurnOutcome", "heldout_seeds",
    "split_of_seed", "tool",
]

from opd_agents.env.registry import register_shipped_envs as _register  # noqa: E402

_register()
