"""The shipped environments under the project's namespace: ``opd_agents.environments.arithmetic`` is the
repository's ``environments/arithmetic.py`` (the same module object).

    from opd_agents.environments.arithmetic import ArithmeticEnv
"""

from opd_agents._alias import alias_package

alias_package(__name__, "environments")
