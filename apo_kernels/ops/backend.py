"""Which backend runs an op: Triton kernels on CUDA (or under Triton's CPU interpreter), the
pure-torch implementation elsewhere. One place, so every op resolves ``backend=`` alike."""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    auto_allows_triton: bool = True,
    shape: tuple[torch.dtype, int, int, int] | None = None,
) -> str:
    """``"auto"`` -> on CUDA (when triton imports and ``auto_allows_triton``): with ``shape =
    (dtype, D, V, N)`` the strategy timed fastest on this GPU for that shape, after the kernels
    passed their first-use self-check (:mod:`apo_kernels.ops.autotune`, cached on disk); without
    ``shape``, ``"triton"``. Elsewhere ``"torch"``. An explicit ``"triton"`` is checked: it needs
    triton, and CUDA tensors unless the interpreter is on (TRITON_INTERPRET=1 set before triton
    was imported)."""
    if backend == "auto":
        if not auto_allows_triton:
            return "torch"
        if shape is not None:
            from . import autotune

            kind, _name = autotune.device_key_fn()(device)
            if kind != "cuda" or not triton_available():
                return "torch"
            dtype, d, v, n = shape
            return autotune.choose_backend(device, dtype, d, v, n)
        use = device.type == "cuda" and triton_available()
        return "triton" if use else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
        from ..kernels.common import interpreter_active

        if device.type != "cuda" and not interpreter_active():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    elif backend != "torch":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend
