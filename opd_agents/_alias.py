"""Make the repository's top-level ``environments`` and ``tools`` packages importable under the
project's namespace too (``opd_agents.tools.calculator``), as the very same module objects: a second copy
would re-register tools and break ``isinstance`` checks."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, alias: str, target: str) -> None:
        self.prefix, self.target = alias + ".", target

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self.prefix):
            return None
        real = self.target + "." + fullname.removeprefix(self.prefix)
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target + "." + spec.name.removeprefix(self.prefix))

    def exec_module(self, module: ModuleType) -> None:
        """Already executed under its real name."""


def alias_package(alias: str, target: str) -> None:
    """Serve ``alias.X`` as the module ``target.X`` (the ``alias`` package itself stays as it is)."""
    if not any(isinstance(f, _AliasFinder) and f.prefix == alias + "." for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(alias, target))
