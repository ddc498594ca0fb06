"""Optional dependencies: import one, or fail with one line naming the extra to install.

``require("rapidfuzz", "clair", "the report")`` returns the module, or raises
:class:`MissingDependency` whose message is one line,
``"the report needs rapidfuzz: pip install 'apo-kernels[clair]'"``; the CLI prints that line and
exits with code 2 instead of showing a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional package is not installed; the message is one line saying what to install."""


def require(module_name: str, extra: str, what: str | None = None, *,
            load: bool = True) -> ModuleType | None:
    """Import ``module_name`` (or only check it is installed) or raise :class:`MissingDependency`.

    Args:
        module_name: the import name (dotted names allowed: ``"rapidfuzz.distance"``).
        extra: the ``apo-kernels`` extra that installs it (``"trl"``, ``"clair"``, ...).
        what: the feature that needs it, for the message (e.g. ``"--gguf-file"``).
        load: import and return the module; with ``False`` only check that it is installed
            (cheaper: imports nothing but parent packages) and return ``None``.
    """
    top = module_name.split(".")[0]
    message = f"{what or f'this feature ({extra})'} needs {top}: pip install 'apo-kernels[{extra}]'"
    if not load:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
            found = False
        if not found:
            raise MissingDependency(message)
        return None
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:  # missing, or installed without one of its own dependencies
        raise MissingDependency(message) from exc
