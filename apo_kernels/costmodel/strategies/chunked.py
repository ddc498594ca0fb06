"""``chunked-cublas``: issue 12's strategy. Per chunk of C tokens, cuBLAS writes the chunk's
logits ``[C, V]`` into a buffer (bf16 inputs, fp32 accumulation, fp32 or bf16 output) and a
Triton epilogue makes one pass over it (online logsumexp, target logit).

Backward (generic op, recompute): per chunk, cuBLAS recomputes the logits, one epilogue pass
forms dz in place (16-bit, the GEMMs' operand), cuBLAS ``dH_c = dz @ W`` (the chunk owns these
rows: written once in the input dtype) and ``dW += dz.T @ h_c`` accumulated in fp32:
``dw_accum="gemm"`` lets cuBLAS(Lt) read and write an fp32 C with beta = 1 (bf16 x bf16 -> fp32,
``torch.addmm(..., out_dtype=torch.float32)``), so the accumulation is part of a compute-bound
GEMM; ``dw_accum="pass"`` writes an fp32 product and adds it in a separate pass
(read 8 B + write 4 B per dW element per chunk).
``fwdgrad``: the preference-loss path, gradients formed in the forward (chunks of whole pairs):
GEMM, statistics pass, dz pass, the two gradient GEMMs: 6NDV, no recompute, no backward.
"""

from __future__ import annotations

from ..epilogue import backward_ops, forward_ops
from ..launch import Launch, cdiv, gemm_hbm
from ..problem import Options, Problem
from ..rates import DeviceRates
from .common import FP32, cast_to_input, zero_fill

ROUND = 256


def chunk_tokens(p: Problem, o: Options, out_bytes: int) -> tuple[int, int]:
    """(C, chunks): the largest multiple of 256 tokens whose ``[C, V]`` buffer fits the budget."""
    c = int(o.chunk_logits_budget_mib * 2**20 // (p.v * out_bytes)) // ROUND * ROUND
    c = max(min(ROUND, p.n), min(c, p.n))
    return c, cdiv(p.n, c)


def _logits_gemm(p: Problem, r: DeviceRates, c: float, out_bytes: int, phase: str, count: int,
                 name: str) -> Launch:
    reads, note = gemm_hbm(int(c), p.v, c * p.d * p.in_bytes, p.v * p.d * p.in_bytes, sms=r.sms,
                           l2_usable=r.l2_usable)
    return Launch(name=name, phase=phase, engine="cublas", tc=((2.0 * c * p.d * p.v, "cublas"),),
                  hbm_read=reads, hbm_write=c * p.v * out_bytes, count=count,
                  l2=note + f"; logits written to HBM ({out_bytes} B each)")


def launches(p: Problem, r: DeviceRates, o: Options, *, out_bytes: int = 4,
             fwdgrad: bool = False) -> list[Launch]:
    c_max, chunks = chunk_tokens(p, o, out_bytes)
    c = p.n / chunks
    logits = c * p.v
    fa, fs = forward_ops(bool(p.softcap), o.with_entropy, from_buffer=True)
    ba, bs = backward_ops(bool(p.softcap), o.with_entropy, from_buffer=True)
    grad_phase = "forward" if fwdgrad else "backward"
    out = [zero_fill("zero fp32 dW", p.v * p.d, grad_phase),
           _logits_gemm(p, r, c, out_bytes, "forward", chunks, f"cuBLAS logits [C={c_max}, V]"),
           Launch(name="epilogue: logsumexp + target", phase="forward", engine="triton",
                  alu_ops=fa * logits, sfu_ops=fs * logits, hbm_read=logits * out_bytes,
                  hbm_write=4 * c * FP32, count=chunks, serial_epilogue=False,
                  l2="one streaming read of the buffer (too large for L2)")]
    if not fwdgrad:
        out.append(_logits_gemm(p, r, c, out_bytes, "backward", chunks, "cuBLAS recompute logits"))
    out.append(Launch(name="epilogue: dz in place", phase=grad_phase, engine="triton",
                      alu_ops=ba * logits, sfu_ops=bs * logits,
                      hbm_read=logits * out_bytes + 4 * c * FP32, hbm_write=logits * p.in_bytes,
                      count=chunks, serial_epilogue=False,
                      l2="one streaming read + write of the buffer"))
    dz = logits * p.in_bytes
    a5, n5 = gemm_hbm(int(c), p.d, dz, p.v * p.d * p.in_bytes, sms=r.sms, l2_usable=r.l2_usable)
    out.append(Launch(name="cuBLAS dH_c = dz @ W", phase=grad_phase, engine="cublas",
                      tc=((2.0 * c * p.d * p.v, "cublas"),), hbm_read=a5,
                      hbm_write=c * p.d * p.in_bytes, count=chunks, l2=n5))
    a6, n6 = gemm_hbm(p.v, p.d, dz, c * p.d * p.in_bytes, sms=r.sms, l2_usable=r.l2_usable)
    if o.dw_accum == "gemm":
        out.append(Launch(name="cuBLAS dW += dz.T @ h_c (fp32 C, beta=1)", phase=grad_phase,
                          engine="cublas", tc=((2.0 * c * p.d * p.v, "cublas"),),
                          hbm_read=a6 + p.v * p.d * FP32, hbm_write=p.v * p.d * FP32, count=chunks,
                          l2=n6 + "; fp32 dW read + written once per chunk"))
    else:
        out += [Launch(name="cuBLAS dz.T @ h_c -> fp32 temp", phase=grad_phase, engine="cublas",
                       tc=((2.0 * c * p.d * p.v, "cublas"),), hbm_read=a6,
                       hbm_write=p.v * p.d * FP32, count=chunks, l2=n6),
                Launch(name="dW += temp (fp32 pass)", phase=grad_phase, engine="torch",
                       hbm_read=2 * p.v * p.d * FP32, hbm_write=p.v * p.d * FP32, count=chunks,
                       alu_ops=float(p.v) * p.d, l2="streaming, dW too large for L2")]
    out.append(cast_to_input("dW fp32 -> input dtype", p.v * p.d, p.in_bytes, grad_phase))
    return out
