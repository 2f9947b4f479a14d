"""The shipped tools under the project's namespace: ``opd_agents.tools.calculator`` is the repository's
``tools/calculator.py`` (the same module object).

    from opd_agents.tools.calculator import calculator
    from opd_agents.tools import calculator as calculator_module
"""

from opd_agents._alias import alias_package

alias_package(__name__, "tools")
