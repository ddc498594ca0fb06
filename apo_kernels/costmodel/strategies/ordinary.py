"""``ordinary``: the PyTorch way, for reference. ``logits = h @ W.T`` (bf16, cuBLAS),
``.float()``, ``log_softmax`` (fp32), ``gather``; autograd's backward: a zero [N, V] gradient
with the scatter, ``log_softmax`` backward, the cast back, and two cuBLAS GEMMs for dH and dW.
Elementwise kernels are memory-bound; ``log_softmax`` (forward and backward) is assumed to read
its input twice (a reduction pass and an elementwise pass: rows of V fp32 do not stay on chip).
"""

from __future__ import annotations

from ..launch import Launch, gemm_hbm
from ..problem import Options, Problem
from ..rates import DeviceRates
from .common import FP32


def launches(p: Problem, r: DeviceRates, o: Options) -> list[Launch]:
    nv = float(p.n) * p.v
    b = p.in_bytes
    a1, n1 = gemm_hbm(p.n, p.v, p.n * p.d * b, p.v * p.d * b, sms=r.sms, l2_usable=r.l2_usable)
    a2, n2 = gemm_hbm(p.n, p.d, nv * b, p.v * p.d * b, sms=r.sms, l2_usable=r.l2_usable)
    a3, n3 = gemm_hbm(p.v, p.d, nv * b, p.n * p.d * b, sms=r.sms, l2_usable=r.l2_usable)
    stream = "streaming, [N, V] far larger than L2"
    return [
        Launch(name="logits = h @ W.T (cuBLAS)", phase="forward", engine="cublas",
               tc=((2.0 * p.n * p.d * p.v, "cublas"),), hbm_read=a1, hbm_write=nv * b, l2=n1),
        Launch(name="logits.float()", phase="forward", engine="torch", hbm_read=nv * b,
               hbm_write=nv * FP32, alu_ops=nv, l2=stream),
        Launch(name="log_softmax (fp32)", phase="forward", engine="torch", hbm_read=2 * nv * FP32,
               hbm_write=nv * FP32, alu_ops=6 * nv, sfu_ops=nv, l2=stream),
        Launch(name="gather", phase="forward", engine="torch", hbm_read=p.n * 32.0,
               hbm_write=p.n * FP32, l2="one sector per token"),
        Launch(name="zeros [N, V] + scatter (gather backward)", phase="backward", engine="torch",
               hbm_write=nv * FP32, l2=stream),
        Launch(name="log_softmax backward", phase="backward", engine="torch",
               hbm_read=3 * nv * FP32, hbm_write=nv * FP32, alu_ops=5 * nv, sfu_ops=nv, l2=stream),
        Launch(name="grad.to(bf16)", phase="backward", engine="torch", hbm_read=nv * FP32,
               hbm_write=nv * b, alu_ops=nv, l2=stream),
        Launch(name="dH = dlogits @ W (cuBLAS)", phase="backward", engine="cublas",
               tc=((2.0 * p.n * p.d * p.v, "cublas"),), hbm_read=a2, hbm_write=p.n * p.d * b, l2=n2),
        Launch(name="dW = dlogits.T @ h (cuBLAS)", phase="backward", engine="cublas",
               tc=((2.0 * p.n * p.d * p.v, "cublas"),), hbm_read=a3, hbm_write=p.v * p.d * b, l2=n3),
    ]
