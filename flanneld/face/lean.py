"""Import pyroute2's modules without its package `__init__`.

`import pyroute2.anything` first runs `pyroute2/__init__.py`, which imports the whole library
(NDB, IPDB, nftables, nl80211, plan9, ethtool, …: 160 modules, 22 MB of RSS) to export its
names. The agent uses three modules of it. `install()` puts a module for the package into
`sys.modules` that has its path, so submodules import as usual, and that runs the real
`__init__` only when a name only it defines is asked for (`from pyroute2 import NDB`): then
every name is there as before. Call it before anything imports pyroute2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

PACKAGE = "pyroute2"


class _LeanPackage(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        try:  # `from pyroute2 import config` and the like: a submodule
            return importlib.import_module(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{PACKAGE}.{name}":
                raise
        self.__class__ = types.ModuleType  # once: the real __init__ defines the rest
        assert self.__spec__ is not None and self.__spec__.loader is not None
        self.__spec__.loader.exec_module(self)
        return getattr(self, name)


def install() -> bool:
    """Put the lean package in place; False when pyroute2 is already imported or missing."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return False
    module = _LeanPackage(PACKAGE)
    module.__spec__, module.__file__ = spec, spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__, module.__loader__ = PACKAGE, spec.loader
    sys.modules[PACKAGE] = module
    return True
