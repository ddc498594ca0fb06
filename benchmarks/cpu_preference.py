"""CPU preference step, side by side: ours (single pass) vs the ordinary way vs Liger.

One training step of the preference head: APO-zero (beta 0.1) on 4 pairs of 256 tokens (64
prompt tokens each, ignored), D=576, V=49152 (SmolLM2's head), fp32, peaked logits; the policy
runs forward+backward (hidden and head get gradients), the reference forward only.

Providers (each a fresh step: gradients released, loss, backward):

- ``ordinary``: eager full logits ``[2B*T, V]``, fp32 ``log_softmax``, ``gather``, masked sums,
  :func:`apo_kernels.preference_loss` (the reference under ``no_grad``);
- ``ours``: ``FusedLinearPreferenceLoss(compute_metrics=False)`` (single pass: dH/dW formed in
  the forward);
- ``ours-metrics``: the same with TRL's metrics (entropy, mean logit, top-1) riding along;
- ``ours-recompute``: the previous path (per-token op with a recompute backward, 8NDV);
- ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(loss_type='apo_zero')``, its
  chunk function under ``torch.compile`` (inductor's CPU backend).

Wall time and process CPU time (``time.process_time``: less sensitive to other processes on a
shared machine, though not to their cache and memory-bandwidth pressure) are both recorded.
Timing is interleaved (A, B, C, ... each repetition, in a rotated order) and every ratio is the
median over repetitions of the per-repetition ratio, so load from other processes on a shared
machine hits both sides of a ratio alike. Peak memory: resident set above the inputs during one
step (``apo_kernels.bench.measure.cpu_peak_above``), after the warm-up.

    python benchmarks/cpu_preference.py            # 15 interleaved repetitions
    python benchmarks/cpu_preference.py --quick    # 3 repetitions (smoke test)

Writes ``benchmarks/results/cpu-preference/<device-slug>.csv`` with the device and versions.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apo_kernels import FusedLinearPreferenceLoss, preference_loss
from apo_kernels.bench.env import device_slug, environment
from apo_kernels.bench.measure import cpu_peak_above

PAIRS, SEQ, PROMPT, D, V = 4, 256, 64, 576, 49152
BETA = 0.1


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Peaked logits (the benchmark suite's recipe): each label's head row is pushed by 6 along
    the mean hidden state predicting it, 20% of labels redrawn; prompt positions ignored."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * PAIRS * SEQ
    hidden = torch.randn(n, D, generator=g)
    weight = torch.randn(V, D, generator=g).mul_(D**-0.5)
    labels = torch.randint(0, V, (n,), generator=g)
    push = torch.zeros(V, D).index_add_(0, labels, hidden)
    push.div_(push.norm(dim=1, keepdim=True).add_(1e-6))
    weight.add_(push, alpha=6.0)
    del push
    flip = torch.rand(n, generator=g) < 0.2
    labels = torch.where(flip, torch.randint(0, V, (n,), generator=g), labels)
    ref_hidden = hidden + 0.1 * torch.randn(n, D, generator=g)
    ref_weight = weight + (0.1 * D**-0.5) * torch.randn(V, D, generator=g)
    labels = labels.view(2 * PAIRS, SEQ).clone()
    labels[:, :PROMPT] = -100
    return dict(hidden=hidden.view(2 * PAIRS, SEQ, D).contiguous().requires_grad_(True),
                weight=weight.requires_grad_(True), labels=labels,
                ref_hidden=ref_hidden.view(2 * PAIRS, SEQ, D).contiguous(), ref_weight=ref_weight)


def ordinary_loss(inp) -> torch.Tensor:
    def seq_logps(h, w, y):
        logits = (h.reshape(-1, D) @ w.T).float()
        logsm = torch.log_softmax(logits, dim=-1)
        mask = y.reshape(-1) != -100
        tok = logsm.gather(-1, y.reshape(-1).clamp(min=0)[:, None]).squeeze(-1) * mask
        return tok.view(2 * PAIRS, SEQ).sum(-1)

    pol = seq_logps(inp["hidden"], inp["weight"], inp["labels"])
    with torch.no_grad():
        ref = seq_logps(inp["ref_hidden"], inp["ref_weight"], inp["labels"])
    b = PAIRS
    return preference_loss(pol[:b], pol[b:], ref[:b], ref[b:], loss_type="apo_zero", beta=BETA).mean()


def make_providers(names: list[str]) -> dict:
    provs = {}
    ours = FusedLinearPreferenceLoss("apo_zero", BETA, compute_metrics=False, backend="torch")
    ours_m = FusedLinearPreferenceLoss("apo_zero", BETA, compute_metrics=True, backend="torch")

    def run_ours(fn):
        return lambda inp: fn(inp["hidden"], inp["weight"], inp["labels"], ref_hidden=inp["ref_hidden"],
                              ref_weight=inp["ref_weight"]).loss

    def recompute(inp):
        import apo_kernels.preference as pm

        real = pm._single_pass_applies
        pm._single_pass_applies = lambda *a, **k: False
        try:
            return run_ours(ours)(inp)
        finally:
            pm._single_pass_applies = real

    provs["ordinary"] = ordinary_loss
    provs["ours"] = run_ours(ours)
    provs["ours-metrics"] = run_ours(ours_m)
    provs["ours-recompute"] = recompute
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(loss_type="apo_zero", beta=BETA, use_ref_model=True)
        provs["liger"] = lambda inp: liger(inp["weight"], inp["hidden"].reshape(-1, SEQ, D),
                                           inp["labels"], ref_input=inp["ref_hidden"],
                                           ref_weight=inp["ref_weight"])[0]
    except ImportError as e:
        print(f"liger skipped: {e} (pip install --no-deps liger-kernel)")
    return {k: v for k, v in provs.items() if not names or k in names}


def step(fn, inp) -> tuple[float, torch.Tensor, float]:
    """(wall seconds, loss, process CPU seconds) of one step."""
    for k in ("hidden", "weight"):
        inp[k].grad = None
    c0, t0 = time.process_time(), time.perf_counter()
    loss = fn(inp)
    loss.backward()
    return time.perf_counter() - t0, loss.detach(), time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions instead of 15")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--providers", nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-preference")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 15)
    torch.manual_seed(0)
    inp = make_inputs()
    provs = make_providers(args.providers)
    names = list(provs)

    # Warm-up (compiles Liger's chunk function) and a correctness check against the ordinary way.
    grads, losses = {}, {}
    for name in names:
        for _ in range(2):
            _, losses[name], _ = step(provs[name], inp)
        grads[name] = (inp["hidden"].grad.clone(), inp["weight"].grad.clone())
    base_loss, (base_dh, base_dw) = losses.get("ordinary"), grads.get("ordinary", (None, None))

    peaks = {}
    for name in names:
        for k in ("hidden", "weight"):
            inp[k].grad = None
        peaks[name] = cpu_peak_above(lambda: step(provs[name], inp))

    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            wall, _, cpu_s = step(provs[name], inp)
            times[name].append(wall)
            cpu[name].append(cpu_s)
        print(f"rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)

    def ratio(a: str, b: str, t: dict = times) -> float:  # speed of b relative to a: median of t_a / t_b
        if a not in t or b not in t:
            return float("nan")
        return statistics.median(x / y for x, y in zip(t[a], t[b]))

    env = environment()
    rows = []
    for name in names:
        ts = sorted(t * 1e3 for t in times[name])
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        dh, dw = grads[name]
        rel = lambda x, y: float((x - y).abs().max() / y.abs().max()) if y is not None else float("nan")
        rows.append(dict(
            device=env["device"], torch=env["torch"], liger_kernel=env["liger-kernel"],
            provider=name, pairs=PAIRS, seq=SEQ, prompt=PROMPT, d=D, v=V, dtype="float32",
            logits="peaked", reps=reps, median_ms=statistics.median(ts), p20_ms=q[0], p80_ms=q[-1],
            speedup_vs_ordinary=ratio("ordinary", name), speedup_vs_liger=ratio("liger", name),
            median_cpu_ms=statistics.median(cpu[name]) * 1e3,
            cpu_speedup_vs_ordinary=ratio("ordinary", name, cpu), cpu_speedup_vs_liger=ratio("liger", name, cpu),
            peak_above_inputs_mib=peaks[name],
            mem_vs_ordinary=peaks[name] / peaks["ordinary"] if "ordinary" in peaks else float("nan"),
            loss=float(losses[name]),
            loss_diff_vs_ordinary=float((losses[name] - base_loss).abs()) if base_loss is not None else float("nan"),
            dh_rel_diff_vs_ordinary=rel(dh, base_dh), dw_rel_diff_vs_ordinary=rel(dw, base_dw),
        ))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device_slug(env)}{'-quick' if args.quick else ''}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{'provider':<16}{'wall ms':>9}{'vs ord':>8}{'vs liger':>9}{'cpu ms':>8}{'vs ord':>8}"
          f"{'vs liger':>9}{'peak MiB':>9}{'mem/ord':>8}")
    for row in rows:
        print(f"{row['provider']:<16}{row['median_ms']:>9.0f}{row['speedup_vs_ordinary']:>7.2f}x"
              f"{row['speedup_vs_liger']:>8.2f}x{row['median_cpu_ms']:>8.0f}{row['cpu_speedup_vs_ordinary']:>7.2f}x"
              f"{row['cpu_speedup_vs_liger']:>8.2f}x{row['peak_above_inputs_mib']:>9.0f}{row['mem_vs_ordinary']:>8.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
