"""CPU side-by-side of the chunked strategy (issue 12 targets), providers interleaved.

    PYTHONPATH=$PWD python benchmarks/cpu_chunked.py            # full: 7 interleaved rounds
    PYTHONPATH=$PWD python benchmarks/cpu_chunked.py --quick    # 3 rounds, no compile variant
    ... --profile                                              # + torch.profiler tables

Shape: SmolLM2's head (N=2048, D=576, V=49152), fp32, peaked logits, 10% ignored tokens.
Providers: ours with each CPU epilogue (``native`` C++, ``torch`` ops, ``compile``), the ordinary
way (eager full logits + fp32 log_softmax + gather), TRL's chunked head if importable, and the
bare GEMMs (the floor). Each round runs every provider once, in the same order, so a load spike
from the shared machine hits neighbours alike; the reported speed ratio is the median over
rounds of ``t_ordinary / t_provider`` within the round. Peak memory above the inputs is one
extra run per provider (resident-set high-water mark, see ``apo_kernels.bench.measure``).
Writes ``benchmarks/results/cpu-chunked/cpu_chunked.csv`` (one row per provider and mode, with
the device and versions) and prints the ratios against the targets.
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from apo_kernels import linear_logprobs
from apo_kernels.bench.env import environment
from apo_kernels.bench.inputs import make_bench_inputs
from apo_kernels.bench.measure import cpu_peak_above
from apo_kernels.bench.specs import Spec
from apo_kernels.chunked import native_available, set_cpu_epilogue
from apo_kernels.chunked.strategy import backward_blocks, chunk_bytes_for

N, D, V = 2048, 576, 49152
IGNORE_FRAC = 0.1
TARGETS = {"forward+backward": (0.85, 0.25), "forward": (1.0, None)}
OUT_DIR = Path(__file__).resolve().parent / "results" / "cpu-chunked"


def make_inputs(seed: int = 0):
    spec = Spec(provider="ordinary", mode="forward", n=N, d=D, v=V, dtype="float32", logits="peaked", seed=seed)
    inp = make_bench_inputs(spec, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed + 1)
    labels = inp.labels.clone()
    labels[torch.rand(N, generator=g) < IGNORE_FRAC] = -100
    return inp.hidden, inp.weight, labels


def ordinary(h, w, y):
    keep = y != -100
    logits = h @ w.T
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(keep, logp, 0.0)


def ours(impl):
    def fn(h, w, y):
        set_cpu_epilogue(impl)
        return linear_logprobs(h, w, y, backend="torch")
    return fn


def trl_head(h, w, y):
    from trl.kernels import ChunkedLogProbFunction

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    keep = y != -100
    logp = ChunkedLogProbFunction.apply(h, w, None, y.clamp(min=0), 1.0, chunk, None, 1.0, ())[0]
    return torch.where(keep, logp, 0.0)


def bare_gemm(h, w, y):
    """The floor: the logits GEMM and (with backward) its two gradient GEMMs, nothing else."""
    return (h @ w.T).sum(-1)


def providers(args) -> dict:
    provs = {"ordinary": ordinary}
    if native_available():
        provs["ours-native"] = ours("native")
    provs["ours-torch"] = ours("torch")
    if args.compile:
        provs["ours-compile"] = ours("compile")
    try:
        import trl.kernels  # noqa: F401

        provs["trl"] = trl_head
    except Exception as exc:  # noqa: BLE001
        print(f"trl skipped: {exc}", file=sys.stderr)
    provs["gemm-only"] = bare_gemm
    return provs


def make_step(fn, mode, h, w, y):
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(h, w, y)
        return step

    def step():
        h.grad = w.grad = None
        out = fn(h, w, y)
        out.sum().backward()
        return out.detach()
    return step


def run(args) -> list[dict]:
    torch.manual_seed(0)
    h, w, y = make_inputs()
    env = environment()
    provs = providers(args)
    budget = chunk_bytes_for(torch.device("cpu"))
    kept = int((y != -100).sum())
    print(f"# {env['device']}; torch {env['torch']}, trl {env['trl']}; threads {torch.get_num_threads()}")
    print(f"# N={N} D={D} V={V} fp32 peaked, {N - kept} ignored; chunk budget {budget / 2**20:.0f} MiB: "
          f"(tokens, vocabulary) block {backward_blocks(kept, V, budget)}")
    rows = []
    modes = ["forward", "forward+backward"] if args.mode == "both" else [args.mode]
    for mode in modes:
        if mode != "forward":
            h.requires_grad_(True)
            w.requires_grad_(True)
        steps = {name: make_step(fn, mode, h, w, y) for name, fn in provs.items()}
        warm, err, peak = {}, {}, {}
        ref = steps["ordinary"]()
        for name, step in steps.items():  # warm-up (builds, compiles) and correctness
            t0 = time.perf_counter()
            out = step()
            warm[name] = time.perf_counter() - t0
            err[name] = float((out - ref).abs().max()) if name != "gemm-only" else float("nan")
            del out
            h.grad = w.grad = None
            peak[name] = cpu_peak_above(step)
            h.grad = w.grad = None
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                gc.collect()
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
                h.grad = w.grad = None
            print(f"  {mode} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1] * 1e3:.0f}" for k, v in times.items()) + " ms", flush=True)
        base = times["ordinary"]
        for name, ts in times.items():
            ratios = [b / t for b, t in zip(base, ts)]
            rows.append(dict(
                mode=mode, provider=name, n=N, d=D, v=V, dtype="float32", logits="peaked",
                ignored=N - kept, rounds=args.rounds, median_ms=1e3 * statistics.median(ts),
                min_ms=1e3 * min(ts), speed_vs_ordinary=statistics.median(ratios),
                ratio_min=min(ratios), ratio_max=max(ratios),
                peak_above_inputs_mib=peak[name], mem_vs_ordinary=peak[name] / max(peak["ordinary"], 1e-9),
                first_call_s=warm[name], max_abs_err_vs_ordinary=err[name],
                chunk_budget_mib=budget / 2**20, device=env["device"], torch=env["torch"],
                trl=env["trl"], threads=torch.get_num_threads()))
        h.requires_grad_(False)
        w.requires_grad_(False)
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{'mode':18} {'provider':13} {'median ms':>10} {'speed x':>8} {'(min..max)':>14} "
          f"{'peak MiB':>9} {'mem x':>6} {'1st call s':>10}")
    for r in rows:
        print(f"{r['mode']:18} {r['provider']:13} {r['median_ms']:10.0f} {r['speed_vs_ordinary']:8.2f} "
              f"{r['ratio_min']:6.2f}..{r['ratio_max']:<6.2f} {r['peak_above_inputs_mib']:9.0f} "
              f"{r['mem_vs_ordinary']:6.2f} {r['first_call_s']:10.1f}")
    print("\ntargets (ours vs the ordinary way, median of per-round ratios):")
    for mode, (speed, mem) in TARGETS.items():
        for r in rows:
            if r["mode"] == mode and r["provider"].startswith("ours"):
                ok = r["speed_vs_ordinary"] >= speed and (mem is None or r["mem_vs_ordinary"] <= mem)
                print(f"  {mode:18} {r['provider']:13} speed {r['speed_vs_ordinary']:.2f}x (>= {speed}) "
                      f"memory {r['mem_vs_ordinary']:.2f}x" + (f" (<= {mem})" if mem else "")
                      + ("  MET" if ok else "  missed"))


def profile() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    h, w, y = make_inputs()
    h.requires_grad_(True)
    w.requires_grad_(True)
    for name, fn in (("ours-native" if native_available() else "ours-torch",
                      ours("native" if native_available() else "torch")), ("ordinary", ordinary)):
        step = make_step(fn, "forward+backward", h, w, y)
        step()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"\n## profile: {name} forward+backward\n{table}")
        (OUT_DIR / f"profile_{name}.txt").write_text(table)


def bf16_memory(tokens: int = 512) -> dict:
    """Peak memory of a bf16 forward+backward (ours vs the ordinary way) next to the sizes that
    matter for issue 12's dW point: the bf16 head, and the fp32 copy of it that a per-chunk
    ``.float()`` or an fp32 ``[V, D]`` accumulator would add (Liger-Kernel#1270)."""
    h, w, y = make_inputs()
    h, w, y = h[:tokens].bfloat16().requires_grad_(), w.bfloat16().requires_grad_(), y[:tokens]
    res = {"tokens": tokens, "head_bf16_mib": w.numel() * 2 / 2**20,
           "head_fp32_copy_mib": w.numel() * 4 / 2**20}
    for name, fn in (("ordinary", ordinary), ("ours", ours("native" if native_available() else "torch"))):
        step = make_step(fn, "forward+backward", h, w, y)
        step()
        h.grad = w.grad = None
        res[f"{name}_peak_above_inputs_mib"] = cpu_peak_above(step)
        h.grad = w.grad = None
    print("\nbf16 forward+backward, N={tokens}: peak above inputs ours {ours_peak_above_inputs_mib:.0f} MiB, "
          "ordinary {ordinary_peak_above_inputs_mib:.0f} MiB; the bf16 head is {head_bf16_mib:.0f} MiB "
          "(its gradient is part of both peaks), an fp32 copy of it {head_fp32_copy_mib:.0f} MiB".format(**res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, no torch.compile variant")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mode", choices=["forward", "forward+backward", "both"], default="both")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile epilogue (its first call compiles for minutes)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bf16-memory", action="store_true",
                    help="also measure the peak memory of a bf16 forward+backward (dW accumulation)")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "cpu_chunked.csv")
    args = ap.parse_args(argv)
    if args.quick:
        args.compile = False
    args.rounds = args.rounds or (3 if args.quick else 7)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report(rows)
    print(f"\nwrote {args.out}")
    if args.profile:
        profile()
    if args.bf16_memory:
        res = bf16_memory()
        with open(args.out.with_name("cpu_chunked_bf16_memory.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(res))
            writer.writeheader()
            writer.writerow(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
