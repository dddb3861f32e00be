"""The service's entry point inside a built Bento (``service = "serving.bento_entry:NextBest"``).

A Bento copies the three folders of the layout (``features/``, ``training/``, ``serving/``) into its ``src/``, but
the code imports them under their installed names, ``nextbest.features`` and so on. Where nextbest is installed
(this machine, a development image) the installed package is what runs. Where it is not (a container built from
the Bento, which installs only the dependencies), this module maps ``nextbest.*`` onto the copied folders before
the service is imported, so the Bento runs the code it carries.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PARTS = ("features", "training", "serving")


def _map_copied_folders(src: Path) -> None:
    package = types.ModuleType("nextbest")
    package.__path__ = []
    sys.modules["nextbest"] = package
    for part in _PARTS:
        spec = importlib.util.spec_from_file_location(
            f"nextbest.{part}", src / part / "__init__.py", submodule_search_locations=[str(src / part)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, part, module)


if importlib.util.find_spec("nextbest") is None:
    _map_copied_folders(Path(__file__).resolve().parents[1])

from nextbest.serving.service import NextBest  # noqa: E402

__all__ = ["NextBest"]
