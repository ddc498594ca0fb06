"""Optional dependencies: one clear line naming the extra to install when one is missing.

The CLI catches :class:`MissingDependency` (an ``ImportError``) and prints its message with exit
code 2, so a user never sees a raw ``ModuleNotFoundError`` traceback for a package that an
``apo-kernels[extra]`` would have installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def require(module: str, extra: str, purpose: str | None = None, *, load: bool = False) -> ModuleType | None:
    """Check that ``module`` can be imported, or raise :class:`MissingDependency`.

    Args:
        module: the import name (``"gguf"``, ``"peft"``, ...).
        extra: the ``apo-kernels`` extra that installs it (``"trl"``, ``"clair"``, ...).
        purpose: what needs it, for the message (e.g. ``"--gguf-file"``); default: apo-kernels.
        load: import the module and return it (default: only check it is installed, which
            is cheaper and imports nothing).

    Returns:
        the module when ``load`` is true, else ``None``.

    Raises:
        MissingDependency: ``module`` is not installed, e.g. "--gguf-file needs the `gguf`
            package: pip install 'apo-kernels[trl]'".
    """
    message = f"{purpose or 'this'} needs the `{module}` package: pip install 'apo-kernels[{extra}]'"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        found = False
    if not found:
        raise MissingDependency(message)
    if not load:
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # installed, but one of its own dependencies is missing
        raise MissingDependency(f"{message} ({exc})") from exc
