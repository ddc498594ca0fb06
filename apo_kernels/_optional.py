"""Optional dependencies: import one, or fail with one line naming the extra to install.

``require("rapidfuzz", "clair")`` returns the module, or raises :class:`MissingDependency`
whose message is ``"<what> needs rapidfuzz: pip install 'apo-kernels[clair]'"``; the CLI prints
that line and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message is one line saying what to
    install."""


def require(module_name: str, extra: str, *, what: str | None = None) -> ModuleType:
    """Import ``module_name`` or raise :class:`MissingDependency`.

    Args:
        module_name: the module to import (dotted names allowed).
        extra: the ``apo-kernels`` extra that installs it.
        what: the feature that needs it, for the message (default: ``apo-kernels[<extra>]``'s
            feature, named after the extra).
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        who = what or f"this feature ({extra})"
        top = module_name.split(".")[0]
        raise MissingDependency(f"{who} needs {top}: pip install 'apo-kernels[{extra}]'") from e
