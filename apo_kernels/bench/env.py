"""The machine and library versions a benchmark ran with (no peer library is imported here)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re

PEERS = ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo where readable, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """Device name and kind (``cuda``/``cpu``) and the versions of torch and every peer."""
    import torch

    env = {name: _version(name) for name in PEERS}
    env["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["device_kind"] = "cuda"
    else:
        env["device"] = f"{cpu_name()} ({os.cpu_count()} cores, {platform.machine()})"
        env["device_kind"] = "cpu"
    return env


def device_slug(env: dict[str, str] | None = None) -> str:
    """A folder name for results, e.g. ``cpu-x86_64-2core`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    env = env or environment()
    if env["device_kind"] == "cpu":
        return f"cpu-{platform.machine()}-{os.cpu_count()}core"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
