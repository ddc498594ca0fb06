"""What one measurement is (:class:`Spec`), what it yields (:class:`BenchRow`), and the shapes.

FLOPs counted per mode (N tokens, hidden size D, vocabulary V):

- ``forward`` (the reference model's case, no autograd): 2NDV;
- ``forward+backward`` (policy log-probs and their gradients): 6NDV (2NDV forward + 4NDV for
  dH and dW; recomputing logits in the backward is not counted);
- ``preference`` (one full preference-loss step: policy forward+backward, reference forward on
  its own hidden states and head, APO-zero loss): 8NDV.

Memory floor: the inputs plus the gradients that must come out (dH, dW), nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODES = ("forward", "forward+backward", "preference")
FLOP_FACTOR = {"forward": 2, "forward+backward": 6, "preference": 8}
LOGITS = ("peaked", "flat")

# lm_head shapes of real models: name -> (D, V, final logit softcap)
HEADS: dict[str, tuple[int, int, float | None]] = {
    "qwen2.5-0.5b": (896, 151936, None),
    "llama-3.2-1b": (2048, 128256, None),
    "gemma-2-2b": (2304, 256000, 30.0),
    "llama-3-8b": (4096, 128256, None),
}
GPU_TOKENS = (4096, 8192, 16384, 32768)
# On a 2-core CPU the heads are scaled down (D / 4, V / 16) and N to hundreds of tokens, so
# that a whole sweep takes minutes; the ratios between heads are kept.
CPU_HEAD_SCALE = (4, 16)
CPU_TOKENS = (256, 512, 1024)
# Preference mode: sequences of at most this many tokens, chosen rows first, then rejected.
MAX_SEQ_LEN = 1024
PREFERENCE_LOSS = "apo_zero"
PREFERENCE_BETA = 0.1


def scaled_heads(scale: tuple[int, int] = CPU_HEAD_SCALE,
                 names: list[str] | None = None) -> dict[str, tuple[int, int, float | None]]:
    """The real heads (or those in ``names``) with D and V divided by ``scale``, named
    ``<head>/<sd>x<sv>`` so a table never passes them off as the real sizes."""
    sd, sv = scale
    return {f"{name}/{sd}x{sv}": (d // sd, v // sv, cap) for name, (d, v, cap) in HEADS.items()
            if names is None or name in names}


def sequence_layout(n: int) -> tuple[int, int]:
    """``(pairs B, sequence length T)`` with ``2 * B * T == n`` for the preference mode."""
    if n < 2 or n % 2:
        raise ValueError(f"the preference mode needs an even number of tokens >= 2, got N={n}")
    t = min(MAX_SEQ_LEN, n // 2)
    while n % (2 * t):
        t -= 1
    return n // (2 * t), t


@dataclass(frozen=True)
class Spec:
    """One measurement: a provider computing one mode at one shape."""

    provider: str
    mode: str
    n: int
    d: int
    v: int
    softcap: float | None = None
    head: str = "custom"
    dtype: str = "float32"
    logits: str = "peaked"
    reps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {self.logits!r}")
        if min(self.n, self.d, self.v) < 1:
            raise ValueError(f"shape sizes must be positive, got N={self.n} D={self.d} V={self.v}")
        if self.mode == "preference":
            sequence_layout(self.n)

    @property
    def flops(self) -> int:
        return FLOP_FACTOR[self.mode] * self.n * self.d * self.v

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class BenchRow:
    """One CSV row: a measurement, or why it was skipped or failed (``status``, ``error``)."""

    device: str
    device_kind: str
    torch_version: str
    triton_version: str
    trl_version: str
    liger_version: str
    cce_version: str
    provider: str
    mode: str
    head: str
    dtype: str
    logits: str
    n: int
    d: int
    v: int
    softcap: str
    status: str  # ok | skipped | error
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    reps: int = 0
    flops: float = float("nan")
    tflops: float = float("nan")
    gemm_tflops: float = float("nan")
    pct_of_gemm: float = float("nan")
    input_mib: float = float("nan")
    peak_above_inputs_mib: float = float("nan")
    peak_total_mib: float = float("nan")
    mem_floor_mib: float = float("nan")
    mem_vs_floor: float = float("nan")
    max_abs_err: float = float("nan")  # forward modes: vs fp32 ordinary log-probs, first tokens
    error: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_csv(self) -> dict:
        return asdict(self)


def row_for(spec: Spec, env: dict[str, str], status: str, error: str = "", **values) -> BenchRow:
    """A row for ``spec`` on the machine described by ``env`` (see :func:`environment`)."""
    return BenchRow(
        device=env["device"], device_kind=env["device_kind"], torch_version=env["torch"],
        triton_version=env["triton"], trl_version=env["trl"], liger_version=env["liger-kernel"],
        cce_version=env["cut-cross-entropy"], provider=spec.provider, mode=spec.mode,
        head=spec.head, dtype=spec.dtype, logits=spec.logits, n=spec.n, d=spec.d, v=spec.v,
        softcap="" if spec.softcap is None else f"{spec.softcap:g}", status=status, error=error,
        flops=float(spec.flops), **values)
