"""``apo-kernels model``: PREDICTED time of every strategy from a cost model (no GPU needed).

Counts FLOPs, HBM bytes (under a stated L2 reuse assumption) and atomics per kernel launch,
turns them into time from stated H100/H200 rates (a roofline per launch plus a fixed launch
overhead) and prints the fraction of the 6NDV floor; ``--measured bench.csv`` puts the numbers
of a real GPU run (``benchmarks/gpu_one_call.sh``) beside them. See docs/cost_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _rate(text: str) -> tuple[str, float]:
    from ..costmodel.rates import TC_EFFICIENCY, DeviceRates

    name, _, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(DeviceRates)} - {"key", "name", "tc_efficiency"}
    fields |= {f"tc.{kind}" for kind in TC_EFFICIENCY}
    if name not in fields:
        raise argparse.ArgumentTypeError(
            f"--rate NAME=VALUE: NAME must be one of {sorted(fields)}, got {name!r}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate {name}: value must be a number, got {value!r}") from None


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--skip-fraction must be a number, got {text!r}") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"--skip-fraction must be in [0, 1), got {text!r}")
    return f


def _phase_flops(phase: str) -> int:
    """FLOPs per N*D*V of a phase at the floor: forward 2, backward 4, both 6."""
    return {"forward": 2, "backward": 4}.get(phase, 6)


def register(subparsers) -> None:
    from ..costmodel.problem import DEFAULT_TOKENS, HEADS
    from ..costmodel.rates import DEVICES
    from ..costmodel.strategies import STRATEGIES

    p = subparsers.add_parser(
        "model", help="PREDICTED time per strategy from a cost model (FLOPs, bytes, atomics)",
        description="Predict, without a GPU, the time of each strategy (ordinary PyTorch, today's "
                    "fused Triton kernels, the owner-computes rebuild, chunked cuBLAS + Triton "
                    "epilogue) on H100/H200 from counted FLOPs, HBM bytes and atomics per launch "
                    "and stated rates, as a fraction of the 6NDV floor. Every number is a "
                    "PREDICTION; the assumptions are printed under the tables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    p.add_argument("--shapes", nargs="+", default=list(HEADS), metavar="SHAPE",
                   help=f"head names ({', '.join(HEADS)}), DxV (N from --tokens) or NxDxV; "
                        "append :sc30 for a softcap")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="N for named/DxV shapes")
    p.add_argument("--skip-fraction", type=_fraction, nargs="+", default=[0.0, 0.5], metavar="F",
                   help="fractions of backward tiles the pre-skip removes (fused strategies only)")
    p.add_argument("--strategy", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--entropy", action="store_true", help="with the entropy output and gradient")
    p.add_argument("--dw-accum", default="gemm", choices=["gemm", "pass"],
                   help="chunked-cublas: fp32 dW accumulated inside cuBLAS (beta=1) or by a pass")
    p.add_argument("--owner-dz-mib", type=float, default=512.0, help="fused-owner dz buffer budget")
    p.add_argument("--chunk-logits-mib", type=float, default=2048.0,
                   help="chunked-cublas logits buffer budget")
    p.add_argument("--rate", type=_rate, action="append", default=[], metavar="NAME=VALUE",
                   help="override a rate/assumption, e.g. fence_us=0.5, atomic_tadds=2, "
                        "bf16_measured_tflops=700, tc.triton-128x128=0.95 (repeatable)")
    p.add_argument("--launches", action="store_true", help="also print every launch's counts")
    p.add_argument("--pivot", action="store_true",
                   help="compact table: one column per strategy, 'ms (%% of floor)'")
    p.add_argument("--no-peers", action="store_true", help="leave out the published-numbers table")
    p.add_argument("--measured", default=None, metavar="BENCH_CSV",
                   help="a bench.csv from benchmarks/gpu_one_call.sh: measured ms beside predicted")
    p.add_argument("--ours-is", default="fused-atomic", choices=list(STRATEGIES),
                   help="the strategy the 'ours' provider ran in --measured")
    p.add_argument("--csv", default=None, metavar="FILE", help="write per-launch and total rows")
    p.add_argument("--markdown", action="store_true",
                   help="plain Markdown tables (the default when stdout is not a terminal)")
    p.set_defaults(func=run)


class _Out:
    """Rich tables on a terminal, Markdown otherwise."""

    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown
        if not markdown:
            from rich.console import Console

            self.console = Console()

    def table(self, title: str, rows, columns=None) -> None:
        from ..costmodel import report

        if not rows:
            return
        if self.markdown:
            print(report.markdown(title, rows, columns))
        else:
            self.console.print(report.rich_table(title, rows, columns))

    def text(self, line: str = "") -> None:
        if self.markdown:
            print(line)
        else:
            self.console.print(line, markup=False, highlight=False)


def run(args: argparse.Namespace) -> int:
    from ..costmodel import report
    from ..costmodel.measured import provider_strategy, read_measurements
    from ..costmodel.peers import PEERS
    from ..costmodel.predict import predict, skip_to_reach_floor
    from ..costmodel.problem import Options, Problem, parse_shape
    from ..costmodel.rates import assumption_lines, device
    from ..costmodel.strategies import STRATEGIES

    try:
        problems = [parse_shape(s, args.tokens) for s in args.shapes]
        overrides: dict = {k: v for k, v in args.rate if not k.startswith("tc.")}
        tc = {k[3:]: v for k, v in args.rate if k.startswith("tc.")}
        if tc:
            from ..costmodel.rates import TC_EFFICIENCY

            overrides["tc_efficiency"] = {**TC_EFFICIENCY, **tc}
        devices = [device(k, **overrides) for k in args.device]
        options = Options(owner_dz_budget_mib=args.owner_dz_mib,
                          chunk_logits_budget_mib=args.chunk_logits_mib, dw_accum=args.dw_accum,
                          with_entropy=args.entropy)
        measurements, notes = read_measurements(args.measured) if args.measured else ([], [])
    except (ValueError, OSError) as exc:
        print(f"apo-kernels model: {exc}", file=sys.stderr)
        return 2
    out = _Out(args.markdown or not sys.stdout.isatty())
    strategies = [STRATEGIES[s] for s in args.strategy]

    def measured_ms(strategy: str, prob: Problem, dev: str) -> float | None:
        if not args.measured:
            return None
        for m in measurements:
            if ((m.device, m.n, m.d, m.v, m.mode) == (dev, prob.n, prob.d, prob.v, "forward+backward")
                    and provider_strategy(m.provider, args.ours_is) == strategy and prob.skip == 0):
                return m.ms
        return float("nan")

    summary, csv_rows, launch_tables = [], [], []
    for rates in devices:
        for prob in problems:
            for f in args.skip_fraction:
                for strat in strategies:
                    if f and not strat.skips:
                        continue  # cuBLAS and PyTorch paths compute every tile anyway
                    pr = predict(strat, dataclasses.replace(prob, skip=f), rates, options)
                    reach = skip_to_reach_floor(strat, prob, rates, options)
                    seen = measured_ms(strat.name, prob, rates.key)
                    summary.append(report.summary_row(pr, reach, seen))
                    csv_rows += report.csv_rows(pr, reach)
                    if args.launches:
                        launch_tables.append(pr)

    out.text(f"# {report.LABEL}")
    out.text("Forward+backward of linear log-probs, bf16 inputs, fp32 accumulation; floor = 6NDV "
             "at the measured GEMM rate; '% of floor' = floor / predicted time.")
    out.text()
    if args.pivot:
        out.table(f"{report.LABEL}: total ms (% of 6NDV floor)",
                  report.pivot(summary, [s.name for s in strategies]))
    else:
        out.table(f"{report.LABEL}: per strategy", summary)
    for pr in launch_tables:
        out.table(f"{report.LABEL}: launches of {pr.strategy} on {pr.rates.key}, "
                  f"{pr.problem.label}, skip {pr.problem.skip:.2f}", report.launch_rows(pr))

    if not args.no_peers:
        rows = []
        for peer in PEERS:
            rates = next((d for d in devices if d.key == peer.device), None)
            rates = rates or device(peer.device, **overrides)
            prob = Problem(n=peer.n, d=peer.d, v=peer.v, name=peer.peer)
            row = {"peer (published, measured by them)": peer.peer, "device": peer.device,
                   "N x D x V": peer.shape, "phase": peer.phase,
                   "published ms": "-" if peer.ms is None else f"{peer.ms:.2f}",
                   "published TFLOP/s": "-" if peer.tflops is None else f"{peer.tflops:.0f}",
                   "published GiB": "-" if peer.memory_gib is None else f"{peer.memory_gib:.1f}",
                   "floor ms (pred.)": report._ms(_phase_flops(peer.phase) * prob.ndv / rates.gemm_flops)}
            for strat in strategies:
                pr = predict(strat, prob, rates, options)
                value = {"forward": pr.forward_s, "backward": pr.backward_s}.get(peer.phase, pr.total_s)
                gradfwd = pr.backward_s == 0
                row[f"{strat.name} ms (pred.)"] = ("-" if peer.phase != "forward+backward" and gradfwd
                                                   else report._ms(value))
            row["source"] = peer.source + (f"; {peer.note}" if peer.note else "")
            rows.append(row)
        out.table(f"Published peer numbers next to our {report.LABEL}", rows)

    if args.measured:
        mrows = []
        for m in measurements:
            strat = provider_strategy(m.provider, args.ours_is)
            pred = None
            if strat is not None and strat in STRATEGIES:
                prob = Problem(n=m.n, d=m.d, v=m.v)
                rates = device(m.device, **overrides)
                pr = predict(STRATEGIES[strat], prob, rates, options)
                if m.mode == "forward":
                    pred = pr.forward_s
                elif m.mode == "forward+backward":
                    pred = pr.total_s
                elif m.mode == "preference":  # policy fwd+bwd + reference forward (loss ignored)
                    pred = pr.total_s + pr.forward_s
            mrows.append({"device": f"{m.device} ({m.source})", "provider": m.provider,
                          "mode": m.mode, "N x D x V": f"{m.n}x{m.d}x{m.v}",
                          "MEASURED ms": f"{m.ms:.2f}", "predicted ms": report._ms(pred),
                          "measured / predicted": "-" if pred is None else f"{m.ms / (pred * 1e3):.2f}",
                          "as strategy": strat or "-"})
        out.table(f"MEASURED ({args.measured}) beside the prediction", mrows)
        for note in notes:
            out.text(note)

    out.text()
    out.text("Assumptions (every number in the tables above is a PREDICTION from these):")
    first = devices[0]
    for line in assumption_lines(first):
        out.text(f"- {line}")
    for other in devices[1:]:
        extra = [l for l in assumption_lines(other) if l not in assumption_lines(first)]
        for line in extra:
            out.text(f"- [{other.key}] {line}")
    for strat in strategies:
        out.text(f"- {strat.name}: {strat.summary}")
    out.text("- buffers: fused-owner dz [M, Vc] within "
             f"{options.owner_dz_budget_mib:g} MiB; chunked-cublas logits [C, V] within "
             f"{options.chunk_logits_budget_mib:g} MiB; dW accumulation in chunked-cublas: "
             f"{options.dw_accum}")
    out.text("- the pre-skip fraction is an input (measure it on your data: "
             "benchmarks/skip_fraction.py); "
             "cuBLAS/PyTorch strategies compute every tile; 'skip for floor' = the fraction at "
             "which a fused strategy would reach the floor")
    out.text("- details and sources: docs/cost_model.md")

    if args.csv:
        report.write_csv(args.csv, csv_rows)
        out.text(f"wrote {len(csv_rows)} PREDICTION rows to {args.csv}")
    return 0
