"""``backend="auto"`` per device: a one-time timing on the user's own GPU, cached on disk, with a
first-use self-check of the fused kernels against the torch path.

Candidates are the fused Triton kernels (``"triton"``) and the chunked strategy (``"torch"``:
vendor GEMMs on ``[chunk, V]`` blocks). On CUDA, for each (device name, dtype, D, V, N bucket)
the first call times both (forward + backward of ``linear_logprobs`` on random inputs of the
bucket's size) and keeps the faster; the choice is stored in a JSON cache, so later processes do
not time again. N buckets are powers of two (``N`` rounded up), so one timing serves every batch
of a similar size.

Before any timing on a (device name, dtype) the self-check runs the Triton kernels on a small
slice (a few tokens, the real D, a slice of V) and compares values and gradients with the torch
path. On a mismatch or an exception the device is recorded as failed in the cache, a warning
says so once, and ``auto`` uses the chunked strategy there: a kernel that has never met this
GPU cannot silently train a model wrong.

On CPU ``auto`` is ``"torch"`` without timing (the kernels run on CPU only under Triton's
interpreter, a test tool).

Cache: ``$APO_KERNELS_CACHE_DIR/autotune.json`` (default ``~/.cache/apo_kernels/autotune.json``),
written atomically (temporary file + ``os.replace``) so concurrent processes never leave a torn
file; an unreadable or corrupted file is ignored with a warning (and rewritten). Under
``torch.distributed`` every rank takes rank 0's choice (one ``broadcast_object_list``), so
ranks never run different backends.

Everything that touches the device is injectable (``device_key``, ``timer``, ``candidates``) so
the selection, caching and fallback logic is tested on CPU.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CACHE_ENV",
    "Candidate",
    "cache_path",
    "choose_backend",
    "default_candidates",
    "n_bucket",
    "reset_memory_cache",
    "self_check",
    "tune",
]

CACHE_ENV = "APO_KERNELS_CACHE_DIR"
CACHE_FILE = "autotune.json"
_FORMAT = 1
#: Tokens, and vocabulary rows at most, of the self-check's slice.
SELF_CHECK_TOKENS = 16
SELF_CHECK_VOCAB = 1024
#: Largest N bucket timed (bigger batches reuse it: the ranking no longer changes with N).
MAX_TIMED_TOKENS = 8192
#: Self-check tolerance relative to the largest torch value, by dtype (the kernels filter
#: gradients by 2^-12 / 2^-15 of their scale in bf16 / fp16 and round differently).
SELF_CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

RunFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]]


@dataclass(frozen=True)
class Candidate:
    """A strategy ``auto`` may pick: ``run(hidden, weight, labels)`` returns differentiable
    fp32 ``(logp [N], entropy [N])`` for the self-check and the timing."""

    name: str
    run: RunFn


def _linear(backend: str) -> RunFn:
    def run(hidden: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        from .linear_logprobs import linear_logprobs

        out = linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
        return out.logprobs, out.entropy

    return run


def default_candidates() -> dict[str, Candidate]:
    """``"triton"`` (fused kernels) and ``"torch"`` (chunked strategy, the self-check's reference)."""
    return {name: Candidate(name, _linear(name)) for name in ("triton", "torch")}


def default_device_key(device: torch.device) -> tuple[str, str]:
    """``(kind, name)``: ``("cuda", "NVIDIA H100 80GB HBM3")`` or ``("cpu", "cpu")``."""
    if device.type == "cuda":
        return "cuda", torch.cuda.get_device_name(device)
    return device.type, device.type


def device_key_fn() -> Callable[[torch.device], tuple[str, str]]:
    """The device-key function in use (module attribute, so tests can swap in a fake GPU)."""
    return default_device_key


def default_timer(name: str, fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` on the GPU (``triton.testing.do_bench``, warm-up included)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=40) / 1e3


def cache_path() -> Path:
    """``$APO_KERNELS_CACHE_DIR/autotune.json``, default ``~/.cache/apo_kernels/autotune.json``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "apo_kernels"
    return base / CACHE_FILE


def n_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_lock = threading.RLock()
_memory: dict[str, dict] = {}  # path -> parsed cache (this process)
_warned: set[str] = set()


def reset_memory_cache() -> None:
    """Forget what this process read or decided (tests; after the cache file was edited)."""
    with _lock:
        _memory.clear()
        _warned.clear()


def _empty() -> dict:
    return {"format": _FORMAT, "self_check": {}, "choices": {}}


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _empty()
    except OSError as e:
        warnings.warn(f"apo_kernels: cannot read the autotune cache {path} ({e}); ignoring it", stacklevel=3)
        return _empty()
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and data.get("format") == _FORMAT
                and isinstance(data.get("self_check"), dict) and isinstance(data.get("choices"), dict)):
            raise ValueError("unexpected layout")
    except ValueError as e:
        warnings.warn(
            f"apo_kernels: the autotune cache {path} is corrupted ({e}); ignoring it (it is rewritten "
            "on the next tuning)", stacklevel=3)
        return _empty()
    return data


def _load(path: Path) -> dict:
    key = str(path)
    if key not in _memory:
        _memory[key] = _read(path)
    return _memory[key]


def _store(path: Path, section: str, key: str, value: dict) -> None:
    """Merge one entry into the file (re-read first: another process may have added some) and
    replace it atomically. A read-only home only costs the cache, never the run."""
    data = _read(path)
    data[section][key] = value
    _memory[str(path)] = data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        if "write" not in _warned:
            _warned.add("write")
            warnings.warn(f"apo_kernels: cannot write the autotune cache {path} ({e}); choices are "
                          "kept for this process only", stacklevel=3)


def _random_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=device) * (2.0 / math.sqrt(d))).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, labels


def _run_with_grads(c: Candidate, hidden: Tensor, weight: Tensor, labels: Tensor) -> list[Tensor]:
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, entropy = c.run(h, w, labels)
    # A generic gradient: both outputs, fixed random weights, so every kernel path is exercised.
    g = torch.Generator(device=logp.device).manual_seed(1)
    gl = torch.randn(logp.shape, generator=g, device=logp.device)
    ge = torch.randn(entropy.shape, generator=g, device=logp.device)
    ((logp * gl).sum() + (entropy * ge).sum()).backward()
    return [logp.detach().float(), entropy.detach().float(), h.grad.float(), w.grad.float()]


def self_check(candidate: Candidate, reference: Candidate, d: int, v: int, dtype: torch.dtype,
               device: torch.device) -> str | None:
    """Compare ``candidate`` with ``reference`` on a slice (few tokens, real D, <= 1024 rows of
    V): ``None`` when they agree, else the reason (a mismatch or the exception)."""
    hidden, weight, labels = _random_inputs(SELF_CHECK_TOKENS, d, min(v, SELF_CHECK_VOCAB), dtype, device, 0)
    labels[3] = -100  # an ignored token
    try:
        ours = _run_with_grads(candidate, hidden, weight, labels)
    except Exception as e:  # noqa: BLE001 - any failure of an untested kernel means "do not use it"
        return f"{type(e).__name__}: {e}"
    theirs = _run_with_grads(reference, hidden, weight, labels)
    rtol = SELF_CHECK_RTOL.get(dtype, 1e-4)
    for name, a, b in zip(("log-probs", "entropy", "dH", "dW"), ours, theirs):
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not bool(torch.isfinite(a).all()):
            return f"{name}: not finite"
        err = float((a - b).abs().max())
        bound = rtol * max(1.0, float(b.abs().max()))
        if err > bound:
            return f"{name}: max difference {err:.3g} > {bound:.3g}"
    return None


def _broadcast(choice: str) -> str:
    """Rank 0's choice on every rank (a no-op outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return choice
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def choose_backend(
    device: torch.device,
    dtype: torch.dtype,
    d: int,
    v: int,
    n: int,
    *,
    device_key: Callable[[torch.device], tuple[str, str]] | None = None,
    timer: Callable[[str, Callable[[], object]], float] | None = None,
    candidates: dict[str, Candidate] | None = None,
    path: Path | None = None,
    broadcast: bool = True,
) -> str:
    """The backend ``auto`` runs for inputs ``[n, d] x [v, d]`` of ``dtype`` on ``device``:
    ``"torch"`` off CUDA; on CUDA the cached or freshly timed faster candidate whose device passed
    the self-check."""
    kind, name = (device_key or default_device_key)(device)
    if kind != "cuda":
        return "torch"
    timer = timer or default_timer
    cands = candidates if candidates is not None else default_candidates()
    path = path or cache_path()
    with _lock:
        choice = _choose_locked(device, dtype, d, v, n, name, timer, cands, path)
    return _broadcast(choice) if broadcast else choice


def _choose_locked(device, dtype, d, v, n, name, timer, cands, path) -> str:
    data = _load(path)
    reference = cands["torch"]
    check_key = f"{name}|{_dtype_name(dtype)}"
    checked = data["self_check"].get(check_key)
    if checked is None:
        failures = {}
        for cname, c in cands.items():
            if cname != "torch":
                reason = self_check(c, reference, d, v, dtype, device)
                if reason is not None:
                    failures[cname] = reason
        checked = {"ok": not failures, "failures": failures}
        _store(path, "self_check", check_key, checked)
    failed = checked.get("failures", {})
    if failed and check_key not in _warned:
        _warned.add(check_key)
        detail = "; ".join(f"{k}: {r}" for k, r in failed.items())
        warnings.warn(
            f"apo_kernels: the fused kernels failed their self-check on {name} ({_dtype_name(dtype)}): "
            f"{detail}. backend='auto' uses the chunked torch strategy on this device (recorded in "
            f"{path}; delete the entry to check again, and please report it).", RuntimeWarning, stacklevel=4)
    usable = {k: c for k, c in cands.items() if k not in failed}
    if len(usable) == 1:
        return next(iter(usable))
    bucket = min(n_bucket(n), MAX_TIMED_TOKENS)
    key = f"{name}|{_dtype_name(dtype)}|D={d}|V={v}|N={bucket}"
    entry = data["choices"].get(key)
    if entry is not None and entry.get("backend") in usable:
        return entry["backend"]
    hidden, weight, labels = _random_inputs(bucket, d, v, dtype, device, 2)
    times = {}
    for cname, c in usable.items():
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)

        def step(c=c, h=h, w=w):
            h.grad = w.grad = None
            logp, _ = c.run(h, w, labels)
            logp.sum().backward()

        try:
            times[cname] = float(timer(cname, step))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is not chosen
            times[cname] = math.inf
            warnings.warn(f"apo_kernels: timing {cname} failed ({type(e).__name__}: {e})", RuntimeWarning,
                          stacklevel=4)
    best = min(times, key=lambda k: (times[k], k != "torch"))
    _store(path, "choices", key, {"backend": best, "seconds": {k: t if math.isfinite(t) else None
                                                               for k, t in times.items()}})
    return best


def tune(shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype], device: torch.device,
         **kwargs) -> list[dict]:
    """Run :func:`choose_backend` for every ``(N, D, V)`` and dtype ahead of time; one row each
    (``n``, ``d``, ``v``, ``dtype``, ``backend``, ``seconds`` per candidate when timed)."""
    rows = []
    for n, d, v in shapes:
        for dt in dtypes:
            backend = choose_backend(device, dt, d, v, n, **kwargs)
            kind, name = (kwargs.get("device_key") or default_device_key)(device)
            entry = None
            if kind == "cuda":
                key = f"{name}|{_dtype_name(dt)}|D={d}|V={v}|N={min(n_bucket(n), MAX_TIMED_TOKENS)}"
                entry = _load(kwargs.get("path") or cache_path())["choices"].get(key)
            rows.append(dict(device=name, n=n, d=d, v=v, dtype=_dtype_name(dt), backend=backend,
                             seconds=(entry or {}).get("seconds")))
    return rows
