"""Every kernel variant the launchers can pick compiles for sm_80 and sm_90 the way Triton's
runtime launcher compiles it, and its SASS passes the gates (compile_check): tensor-core MMA
(wgmma on sm_90) in every dot kernel, pipelined operand loads in every K loop, no spills, no
GPU-scope fence around any atomic. On this CPU-only machine: Triton compiles without a GPU.

The check runs in a subprocess: this session imported the kernels under the interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PROBES = str(Path(__file__).with_name("compile_gate_probes.py"))
MANIFEST_FIELDS = ("kernel", "config", "dtype", "target", "cubin", "registers", "shared_memory",
                   "spills", "HGMMA", "HMMA", "LDGSTS", "UTMALDG", "ATOMG", "REDG", "MEMBAR",
                   "gates")
DOT_KERNELS = {"_forward_kernel", "_dz_kernel", "_dw_kernel", "_dh_kernel"}
#: Kernels of the log-prob op: since the rebuild none of them has an atomic.
LOGPROB_KERNELS = DOT_KERNELS | {"_merge_kernel", "_label_residual_kernel"}


def _compile_check(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "apo_kernels.kernels.compile_check", *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def full_check(tmp_path_factory):
    """The whole check, both archs, once for this module: (exit code, manifest, dump dir)."""
    out = tmp_path_factory.mktemp("cubins")
    proc = _compile_check("--dump-dir", str(out), "--json")
    assert (out / "compile.json").exists(), proc.stderr[-3000:]
    return proc, json.loads((out / "compile.json").read_text()), out


@pytest.mark.parametrize("arch", [80, 90])
def test_every_variant_passes_the_sass_gates(full_check, arch):
    proc, entries, _ = full_check
    mine = [e for e in entries if e["target"] == f"sm_{arch}"]
    assert LOGPROB_KERNELS | {"_preference_head_fwd", "_preference_head_bwd",
                              "_chunk_forward_kernel", "_chunk_grad_kernel"} <= {e["kernel"] for e in mine}
    failed = [f"{e['kernel']} {e['config']}: {e['gates']} (spills {e['spills']}, "
              f"MEMBAR.GPU {e['MEMBAR_GPU']}, LDGSTS {e['LDGSTS']})"
              for e in mine if not e["passed"]]
    assert not failed, "gates failed:\n" + "\n".join(failed)
    # (a dbias-only dW launch has no GEMM)
    dots = [e for e in mine if e["kernel"] in DOT_KERNELS and ".db-" not in e["config"]]
    # The gates were applied, not skipped: what they look for is there.
    assert all(e["LDGSTS"] + e["UTMALDG"] > 0 and e["spills"] == 0 for e in dots)
    sixteen_bit = [e for e in dots if e["dtype"] in ("bf16", "fp16")]
    assert sixteen_bit and all((e["HGMMA"] if arch == 90 else e["HMMA"]) > 0 for e in sixteen_bit)
    assert all(e["ATOMG"] + e["REDG"] == 0 for e in mine if e["kernel"] in LOGPROB_KERNELS)
    assert all(e["MEMBAR_GPU"] == 0 for e in mine)
    if arch == 90:
        # wgmma at least 64 rows and 64 columns per warp group in every 16-bit GEMM.
        narrow = [f"{e['kernel']} {e['config']}: {s}" for e in sixteen_bit
                  for s in e["hgmma_shapes"] if int(s.split("x")[1]) < 64]
        assert not narrow, f"narrow wgmma shapes: {narrow}"
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_dump_dir_writes_cubins_and_a_manifest(full_check):
    _, entries, out = full_check
    assert entries and {e["target"] for e in entries} == {"sm_80", "sm_90"}
    names = set()
    for e in entries:
        assert all(f in e for f in MANIFEST_FIELDS), sorted(set(MANIFEST_FIELDS) - set(e))
        assert re.fullmatch(r"sm_(80|90)", e["target"])
        assert e["cubin"] == f"{e['kernel']}.{e['config']}.sm{e['target'][3:]}.cubin"
        cubin = (out / e["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
        assert e["registers"] > 0 and set(e["gates"]) == {"tensor_core", "pipelined",
                                                          "no_spills", "relaxed_atomics"}
        names.add(e["cubin"])
    assert len(names) == len(entries)  # one file per (kernel, config, arch)


def test_gates_fail_on_a_fenced_atomic_and_on_unmarked_loads(tmp_path):
    """The same small GEMM: passes as the launcher compiles it; an acq_rel atomic brings
    MEMBAR.ALL.GPU (gate fails); without alignment/divisibility marks no cp.async (gate fails)."""
    proc = _compile_check("--modules", PROBES, "--arch", "80", "90", "--json",
                          "--dump-dir", str(tmp_path), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    entries = {(e["config"].rsplit("-", 1)[1], e["target"]): e
               for e in json.loads((tmp_path / "compile.json").read_text())}
    for arch in ("sm_80", "sm_90"):
        good, fenced, unmarked = (entries[(v, arch)] for v in ("relaxed", "acq_rel", "unmarked"))
        assert good["passed"] and good["LDGSTS"] > 0 and good["REDG"] > 0
        assert good["MEMBAR_GPU"] == 0
        assert fenced["gates"]["relaxed_atomics"] is False and fenced["MEMBAR_GPU"] > 0
        assert unmarked["gates"]["pipelined"] is False and unmarked["LDGSTS"] == 0
        assert unmarked["gates"]["relaxed_atomics"] is True  # only what was broken fails
    assert entries[("relaxed", "sm_90")]["HGMMA"] > 0 and entries[("relaxed", "sm_80")]["HMMA"] > 0


def test_launchers_specialise_exactly_as_the_specs_say():
    """Triton's own binder on the real launchers' arguments (kernels captured, not run) gives
    the same signature, constexprs and divisibility marks as each matching LaunchSpec, every
    spec is reached, and two cubins compiled both ways are byte-identical."""
    proc = _compile_check("--verify-launchers", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launchers match launch_specs()" in proc.stdout


def test_cli_prints_the_sass_table_and_fails_on_a_broken_gate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "250"
    proc = subprocess.run(
        [sys.executable, "-m", "apo_kernels.cli", "check", "--backends", "torch", "--dtypes",
         "float32", "--shapes", "5x16x33", "--no-preference", "--compile", "--compile-arch", "90",
         "--compile-modules", PROBES, "--dump-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    for word in ("HGMMA", "LDGSTS", "REDG", "MEMBAR", "FAIL relaxed_atomics", "FAIL pipelined",
                 "_probe_gemm_atomic"):
        assert word in proc.stdout, word
    assert (tmp_path / "compile.json").exists()


def test_sass_parser_counts_opcodes_scopes_and_shapes():
    from apo_kernels.kernels.compile_check import sass_stats

    sass = """
        /*0a20*/                   LDGSTS.E.BYPASS.128 [R75+0x6000], desc[UR14][R14.64], P2 ;
        /*0a30*/               @P2 LDGSTS.E.BYPASS.128 [R75+0x7000], desc[UR14][R14.64], P2 ;
        /*10d0*/                   MEMBAR.ALL.CTA ;
        /*11d0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*11e0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*2000*/                   MEMBAR.ALL.GPU ;
        /*2010*/              @!P0 ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R2, [R2.64], R5 ;
        /*2020*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;
        /*2030*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU [R2.64], R4 ;
        /*2040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*2050*/                   STL [R1], R2 ;
    """
    s = sass_stats(sass)
    assert (s["LDGSTS"], s["HGMMA"], s["HMMA"], s["MEMBAR"], s["MEMBAR_GPU"]) == (2, 2, 1, 2, 1)
    assert (s["ATOMG"], s["REDG"], s["UTMALDG"], s["STL"]) == (1, 2, 0, 1)
    assert s["hgmma_shapes"] == ["64x128x16", "64x64x16"] and s["hmma_shapes"] == ["16816"]


def test_tile_table_keeps_the_invariants_the_launchers_rely_on():
    """The forward's BLOCK_V (the tile-max buffer has a column per forward tile) is a multiple
    of the dz kernel's (pre-skip); every 16-bit / TF32 GEMM tile has >= 64 rows and n >= 64."""
    from apo_kernels.kernels.configs import backward_variants, forward_variants

    # (forward_config itself answers with the interpreter's tiles in this process)
    fwd_block_v = {}
    for cfg, dtype, _precision, _heavy in forward_variants():
        fwd_block_v.setdefault(dtype, set()).add(cfg.block_v)
    assert all(len(widths) == 1 for widths in fwd_block_v.values()), fwd_block_v
    for cfg, dtype, precision in backward_variants():
        assert next(iter(fwd_block_v[dtype])) % cfg.dz.block_v == 0, (dtype, cfg)
        if dtype != torch.float32 or precision == "tf32":
            assert cfg.dz.block_n >= 64 and cfg.dz.block_v >= 64, cfg.dz
            assert min(cfg.dw.block_m, cfg.dw.block_n) >= 64, cfg.dw
            assert min(cfg.dh.block_m, cfg.dh.block_n) >= 64, cfg.dh
    for cfg, dtype, precision, _heavy in forward_variants():
        if dtype != torch.float32 or precision == "tf32":
            assert cfg.block_n >= 64 and cfg.block_v >= 64, cfg
