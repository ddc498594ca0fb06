"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90, with no
register spills and with tensor-core MMAs, on this CPU-only machine (see compile_check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_config_compiles_without_spills(arch):
    # A subprocess: this test session imported the kernels under the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "apo_kernels.kernels.compile_check", str(arch)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in results} == {
        "_forward_kernel", "_merge_kernel", "_backward_atomic_kernel",
        "_backward_dh_kernel", "_backward_dw_kernel", "_label_term_kernel",
        "_preference_head_fwd", "_preference_head_bwd"}
    assert all(r["arch"] == arch for r in results)
    spills = [f"{r['kernel']} {r['dtype']} flags={r['flags']} {r['config']}: {r['local_bytes']} B"
              for r in results if r["local_bytes"] > 0]
    assert not spills, "register spills:\n" + "\n".join(spills)
    no_mma = [f"{r['kernel']} {r['dtype']}" for r in results
              if r["kernel"] in ("_forward_kernel", "_backward_atomic_kernel", "_backward_dh_kernel",
                             "_backward_dw_kernel") and r["dtype"] != "fp32" and not r["has_tensor_core_mma"]]
    assert not no_mma, f"16-bit kernels without tensor-core MMA: {no_mma}"
