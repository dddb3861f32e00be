"""Names a split moved to another module, still importable from their old module, without an import cycle.

A module split along its seams keeps answering ``from old import name`` for every name it moved out. Where
the new module imports the old one (the moved code calls what stayed behind), the old one cannot import it
back at the top: that would be a cycle. Instead the old module sets ``__getattr__ = moved_names(__name__,
{...})``, and a moved name is imported from its new module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that finds each moved name in its new module.

    Args:
        module: the old module's ``__name__`` (for the error of a name that was never there).
        moved: new module → the names that moved there, separated by spaces
            (``{"nextbest.training.propensity_eval": "PropensityReport evaluate_propensity"}``).
    """
    home = {name: target for target, names in moved.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        target = home.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(target), name)

    __getattr__.moved = dict(home)  # type: ignore[attr-defined]  # name → new module, for tests and readers
    return __getattr__
