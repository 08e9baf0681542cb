"""Import the recipe scripts (`recipes/*.py` are scripts, not a package) from tests."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe(name: str):
    """recipes/<name>.py as a module (imported once; `_common` is the module the recipes themselves import)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    if name == "_common":  # the recipes import it under this name: share that one module
        return importlib.import_module("_common")
    if f"recipe_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"recipe_{name}"]
