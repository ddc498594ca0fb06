"""The C++ chunk epilogue (``apo_kernels/csrc/chunk_epilogue.cpp``), built on first use.

Built with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja) into
``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/apo_kernels/torch_extensions``. Never built by
pip (nothing in ``setup.py``/``pyproject.toml`` compiles it): an isolated build environment could
otherwise pull another torch. Compiled with ``-march=native`` for this machine's SIMD; the
extension name carries a hash of the source, the flags, the torch version and the CPU model, so
a cache shared by different machines or torch versions never loads a mismatched build.

Any failure (no compiler, no ninja, a compile error, ``APO_KERNELS_NATIVE=0``) returns None
after one warning line; callers then use the pure-torch epilogue.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "chunk_epilogue.cpp"
CFLAGS = ("-O3", "-march=native", "-std=c++17")
DISABLE_ENV = "APO_KERNELS_NATIVE"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """``apo_chunk_epilogue_<hash>``: changes with the source, flags, torch and CPU."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(),
                 _cpu_model().encode()):
        key.update(part)
    return f"apo_chunk_epilogue_{key.hexdigest()[:12]}"


def build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "apo_kernels" / "torch_extensions"
    return base / name


@functools.cache
def load_native():
    """``torch.ops.apo_chunk_native`` (ops ``forward_epilogue``, ``grad_inplace``) or None."""
    if os.environ.get(DISABLE_ENV, "1") in ("0", "false", "False", "off"):
        log.debug("native chunk epilogue disabled by %s", DISABLE_ENV)
        return None
    try:
        from torch.utils.cpp_extension import load

        name = extension_name()
        folder = build_directory(name)
        folder.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
             build_directory=str(folder), is_python_module=False, verbose=False)
        return torch.ops.apo_chunk_native
    except Exception as exc:  # noqa: BLE001 - any build/load failure means: use pure torch
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("apo_kernels: C++ chunk epilogue unavailable (%s: %s); using the pure-torch "
                    "epilogue (set %s=0 to skip the build)", type(exc).__name__, first_line[:200],
                    DISABLE_ENV)
        return None


def native_available() -> bool:
    return load_native() is not None
