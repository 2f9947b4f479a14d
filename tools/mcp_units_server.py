"""An MCP server with unit-conversion tools (the SDK's ``MCPServer``): the example server of
``environments/mcp_units.py`` and the MCP adapter's docs.

    python -m tools.mcp_units_server                 # stdio (what MCPToolEnv starts by default)
    python -m tools.mcp_units_server --http 8000     # streamable HTTP at http://127.0.0.1:8000/mcp
"""

from __future__ import annotations

import logging
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# unit -> (quantity, factor to the quantity's base unit); temperatures are affine (see to_base/from_base)
UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "C": ("temperature", 1.0), "F": ("temperature", 1.0), "K": ("temperature", 1.0),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
}
SIGNIFICANT_DIGITS = 6

server = MCPServer("units", log_level="ERROR")


def convert_value(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``, to 6 significant digits."""
    for unit in (from_unit, to_unit):
        if unit not in UNITS:
            raise ToolError(f"unknown unit {unit!r}; known units: {', '.join(UNITS)}")
    if UNITS[from_unit][0] != UNITS[to_unit][0]:
        raise ToolError(f"cannot convert {UNITS[from_unit][0]} ({from_unit}) to {UNITS[to_unit][0]} ({to_unit})")
    if UNITS[from_unit][0] == "temperature":
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        out = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    else:
        out = value * UNITS[from_unit][1] / UNITS[to_unit][1]
    return float(f"{out:.{SIGNIFICANT_DIGITS}g}")


@server.tool()
def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a quantity between units of the same kind (length, mass, temperature, volume)."""
    return convert_value(value, from_unit, to_unit)


@server.tool()
def list_units() -> dict[str, list[str]]:
    """The units convert() knows, by kind of quantity."""
    kinds: dict[str, list[str]] = {}
    for unit, (kind, _) in UNITS.items():
        kinds.setdefault(kind, []).append(unit)
    return kinds


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # stdio: stderr is the client's log; keep it to real failures
    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
