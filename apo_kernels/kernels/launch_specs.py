"""What a launcher can pick, declared next to the kernel, so the compile check builds exactly that.

Each kernel module exposes ``launch_specs() -> list[LaunchSpec]``: one entry per compiled variant
its launchers can choose on a GPU (every tile configuration, dtype and constexpr flag set that
changes code). ``compile_check`` compiles each entry the way Triton's runtime launcher does
(16-byte-aligned pointers and integer arguments divisible by 16 marked ``tt.divisibility=16``)
and gates the SASS (tensor-core MMA, pipelined loads, no spills, no fenced atomics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchSpec:
    """One compiled variant of one ``@triton.jit`` kernel.

    kernel: the ``@triton.jit`` function.
    config: short label of the tile configuration, e.g. ``"128x128x64w8s3"`` (file-name safe).
    dtype: the input (hidden/weight) dtype the variant is compiled for.
    constexprs: every ``tl.constexpr`` argument's value (plus any argument fixed to a constant,
        e.g. a unit stride ``stride_hd=1``, which the launcher also specialises).
    num_warps, num_stages: launch options.
    divisible: names of integer arguments the fast path assumes are multiples of 16 (the
        launcher marks them ``tt.divisibility=16``; ``D`` and row strides, typically). The
        launcher must guarantee them at run time (pad/copy) or pick a spec without them.
    types: argument types that the naming convention in ``compile_check`` would get wrong
        (``{"arg": "*i32"}``); pointers named ``h_ptr``/``w_ptr``/``b_ptr`` take ``dtype``.
    expects_dot: the kernel has a ``tl.dot`` (gate: HGMMA on sm_90 for 16-bit, HMMA on sm_80).
    expects_pipelined: the kernel has a K loop whose operand loads must be pipelined
        (gate: LDGSTS or UTMALDG present).

    Optional (defaults keep the meaning above):
    variant: file-name-safe label of the flag set (``"all"``, ``"none"``, ``"tf32"``...), so
        specs sharing a tile config and dtype get distinct names in the check's output.
    aligned: every pointer argument is 16-byte aligned (the launcher guarantees it), so it is
        marked ``tt.divisibility=16``. ``False`` only for probes of the gates themselves.
    archs: the compute capabilities (``80``, ``90``) whose launchers pick this variant; empty
        means every architecture the check compiles for.
    """

    kernel: Any
    config: str
    dtype: torch.dtype
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 1
    divisible: tuple[str, ...] = ()
    types: dict[str, str] = field(default_factory=dict)
    expects_dot: bool = False
    expects_pipelined: bool = False
    variant: str = ""
    aligned: bool = True
    archs: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.kernel.__name__
