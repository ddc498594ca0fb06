"""``apo-kernels clair``: generate, revise, build, run (all three + report), report.

Only argparse is imported at module level; the pipeline (httpx, transformers, datasets,
matplotlib) loads when a subcommand runs, so ``apo-kernels --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


# ----------------------------------------------------------------------------- arguments


def _add_io(p: argparse.ArgumentParser, response_default: str | None) -> None:
    p.add_argument("-i", "--input", required=True,
                   help="JSONL, JSON or parquet file, or an HF datasets directory")
    p.add_argument("-o", "--out-dir", required=True,
                   help="output directory (also holds the resumable stores)")
    p.add_argument("--split", help="split to read from a DatasetDict directory")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--prompt-field", default="prompt",
                   help="field with the prompt: a string or chat messages (default: prompt)")
    p.add_argument("--response-field", default=response_default,
                   help="field with an existing answer"
                   + (" (used instead of generating when present)" if response_default is None
                      else f" (default: {response_default})"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_client(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("requests (OpenAI-compatible servers)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per request attempt (default 120)")
    g.add_argument("--max-retries", type=int, default=6,
                   help="retries on 429/5xx/timeouts/connection errors (default 6)")
    g.add_argument("--backoff-base", type=float, default=1.0,
                   help="first backoff delay in seconds, doubled per retry (default 1)")
    g.add_argument("--backoff-max", type=float, default=60.0, help="longest backoff (default 60)")
    g.add_argument("--retry-failed", action="store_true",
                   help="also redo items with a permanent failure from an earlier run "
                        "(transient ones, e.g. connection errors, are always retried)")
    g.add_argument("--batch-size", type=int, default=8, help="local models: prompts per batch")
    g.add_argument("--device", help="local models: torch device (default cuda if available)")
    g.add_argument("--dtype", help="local models: torch dtype to load in, e.g. bfloat16")


def _add_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target model (answers = rejected)")
    g.add_argument("--model", required=True,
                   help="model name on the server, or a local HF model id/path")
    g.add_argument("--base-url",
                   help="OpenAI-compatible server, e.g. http://localhost:8000/v1 "
                        "(without it, --model is loaded locally with transformers)")
    g.add_argument("--api-key-env",
                   help="environment variable holding the API key, e.g. "
                        f"{DEFAULT_KEY_ENV} (default: no key)")
    g.add_argument("--gguf-file", help="local: GGUF file inside the --model folder")
    g.add_argument("--max-tokens", type=int, default=1024, help="answer length limit")
    g.add_argument("--temperature", type=float, help="sampling temperature (server default; "
                   "local: greedy when unset)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="sampling seed passed to the server/model")
    g.add_argument("--system-prompt", help="system message added to prompts without one")


def _add_reviser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reviser (revision = chosen)")
    g.add_argument("--reviser-model", required=True,
                   help="reviser model name on the server, or a local HF model id/path")
    g.add_argument("--reviser-base-url",
                   help="OpenAI-compatible server for the reviser (without it: local)")
    g.add_argument("--reviser-api-key-env",
                   help="environment variable holding the reviser's API key, e.g. "
                        f"{DEFAULT_KEY_ENV} (default: no key)")
    g.add_argument("--reviser-gguf-file", help="local: GGUF file inside the reviser folder")
    g.add_argument("--reviser-max-tokens", type=int, default=4096)
    g.add_argument("--reviser-temperature", type=float, default=0.0,
                   help="default 0: revisions should be deliberate, not creative")
    g.add_argument("--template", help="file with a reviser prompt template containing "
                   "{{prompt}} and {{response}} (default: the built-in CLAIR prompt)")
    g.add_argument("--allow-meta", action="store_true",
                   help="accept revisions that mention being a revision or a student")
    g.add_argument("--structured", choices=("auto", "on", "off"), default="auto",
                   help="ask the server for a JSON-schema reply (response_format): on, off "
                        "(tagged format only), or auto: JSON, falling back to the tagged "
                        "format for the rest of the run when the server rejects it or ignores "
                        "it (default auto)")


def _add_build(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--format", choices=("both", "string", "messages"), default="both",
                   help="plain strings, chat messages, or both (default both)")
    g.add_argument("--keep-identical", action="store_true",
                   help="keep pairs whose revision equals the original")
    g.add_argument("--no-hf-dataset", action="store_true",
                   help="write JSONL only, not HF datasets directories")


def _add_report_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")


# ----------------------------------------------------------------------------- helpers


def _api_key(env_name: str | None, arg: str) -> str | None:
    # No implicit default: picking up OPENAI_API_KEY on its own would send a hosted API's key
    # to whatever --base-url points at (a local vLLM, a colleague's server).
    if env_name is None:
        return None
    # A key read from a file keeps its newline, which is an illegal header value: strip it.
    key = (os.environ.get(env_name) or "").strip()
    if not key:
        raise _usage_error(f"{arg}: environment variable {env_name} is not set")
    return key


def _usage_error(msg: str) -> Exception:
    from .io import ClairInputError

    return ClairInputError(msg)


def _retry(args: argparse.Namespace) -> Any:
    from .client import RetryPolicy

    return RetryPolicy(max_retries=args.max_retries, backoff_base=args.backoff_base,
                       backoff_max=args.backoff_max)


def _target_backend(args: argparse.Namespace) -> Any:
    if args.base_url:
        from .backends import OpenAIBackend

        params = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                  "top_p": args.top_p, "seed": args.seed}
        return OpenAIBackend(args.base_url, args.model, _api_key(args.api_key_env,
                                                                 "--api-key-env"),
                             concurrency=args.concurrency, timeout=args.timeout,
                             retry=_retry(args), params=params)
    from .backends import LocalBackend
    from .local import LocalGenerator

    return LocalBackend(LocalGenerator(
        args.model, batch_size=args.batch_size, max_new_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p,
        seed=args.seed if args.seed is not None else 0, device=args.device, dtype=args.dtype,
        gguf_file=args.gguf_file))


def _reviser_backend(args: argparse.Namespace) -> Any:
    if args.reviser_base_url:
        from .backends import OpenAIBackend

        params = {"max_tokens": args.reviser_max_tokens,
                  "temperature": args.reviser_temperature}
        return OpenAIBackend(args.reviser_base_url, args.reviser_model,
                             _api_key(args.reviser_api_key_env, "--reviser-api-key-env"),
                             concurrency=args.concurrency, timeout=args.timeout,
                             retry=_retry(args), params=params)
    from .backends import LocalBackend
    from .local import LocalGenerator

    return LocalBackend(LocalGenerator(
        args.reviser_model, batch_size=args.batch_size, max_new_tokens=args.reviser_max_tokens,
        temperature=args.reviser_temperature or None, device=args.device, dtype=args.dtype,
        gguf_file=args.reviser_gguf_file))


def _read(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .io import read_records

    records = read_records(args.input, split=args.split)
    if args.limit is not None:
        if args.limit < 1:
            raise _usage_error(f"--limit: must be at least 1 (got {args.limit})")
        records = records[: args.limit]
    return records


def _source(args: argparse.Namespace) -> str:
    """The input as named in errors (the steps refuse an empty input by this name)."""
    return str(args.input) + (f" (split {args.split!r})" if args.split else "")


MAX_REASONS = 5


def _print_failures(stats: Any, c: Any) -> None:
    """The most common failure reasons of a step, and what a rerun would do about them."""
    reasons = list((stats.failure_reasons or {}).items())
    if not stats.failed or not reasons:
        return
    shown = reasons[:MAX_REASONS]
    more = f", top {len(shown)} of {len(reasons)}" if len(reasons) > len(shown) else ""
    c.print(f"  {stats.step} failures by reason ({stats.failed} items{more}):",
            markup=False, highlight=False)
    width = len(str(shown[0][1]))
    for reason, n in shown:
        text = reason if len(reason) <= 160 else reason[:157] + "..."
        c.print(f"    {n:>{width}} x {text}", markup=False, highlight=False)
    permanent = stats.failed - stats.transient
    if stats.transient:
        c.print(f"  {stats.transient} transient (connection, timeout, 429/5xx): rerun the same "
                "command to retry them"
                + (f"; {permanent} other(s) are kept as done, --retry-failed redoes them"
                   if permanent else ""), markup=False, highlight=False)
    else:
        c.print("  these are kept as done; --retry-failed redoes them", markup=False,
                highlight=False)
    if "failures" in stats.outputs:
        c.print(f"  details: {stats.outputs['failures']}", markup=False, highlight=False)


def _print_stats(stats: Any, failures: bool = True) -> None:
    from rich.console import Console

    c = Console(stderr=True, soft_wrap=True)  # long paths and reasons stay on one line
    u = stats.usage or {}
    tokens = (f", tokens this run: {u.get('prompt_tokens', 0)} prompt + "
              f"{u.get('completion_tokens', 0)} completion, {u.get('retries', 0)} retries"
              if stats.ran else "")
    c.print(f"{stats.step}: {stats.total} items, {stats.ok} ok, "
            f"{stats.failed} failed, {stats.cached} already done, {stats.ran} run"
            + (f", {stats.skipped} skipped" if stats.skipped else "") + tokens,
            style="bold", markup=False, highlight=False)
    fmt = getattr(stats, "structured", None)
    if fmt:
        used = ("JSON schema (response_format)" if fmt["used"] == "json"
                else "tagged (<revised_answer>)")
        why = f"; fell back: {fmt['fallback']}" if fmt.get("fallback") else ""
        c.print(f"  reply format: {used} (--structured {fmt['requested']}{why})",
                markup=False, highlight=False)
    for name, path in stats.outputs.items():  # paths may hold [brackets]: no markup
        c.print(f"  {name}: {path}", markup=False, highlight=False)
    if failures:
        _print_failures(stats, c)


# (module, what needs it): checked before any work, so a missing one costs nothing.
def _dependencies(args: argparse.Namespace) -> list[tuple[str, str]]:
    cmd = args.clair_command
    need: list[tuple[str, str]] = []

    def model(base_url: str | None, gguf: str | None, url_flag: str, gguf_flag: str) -> None:
        if base_url:
            need.append(("httpx", "CLAIR requests to a server"))
            return
        need.append(("transformers", f"CLAIR with a local model (no {url_flag})"))
        if gguf:
            need.extend([("gguf", gguf_flag), ("accelerate", gguf_flag)])

    if cmd in ("generate", "run"):
        model(args.base_url, args.gguf_file, "--base-url", "--gguf-file")
    if cmd in ("revise", "run"):
        model(args.reviser_base_url, args.reviser_gguf_file, "--reviser-base-url",
              "--reviser-gguf-file")
    if cmd in ("generate", "revise", "run"):
        need.append(("tqdm", "CLAIR progress output"))
    if cmd in ("build", "run") and not args.no_hf_dataset:
        need.append(("datasets", "writing an HF datasets directory (or pass --no-hf-dataset)"))
    if cmd in ("run", "report"):
        need.append(("rapidfuzz", f"clair {cmd}'s contrastiveness report"))
    if cmd == "run" or (cmd == "report" and args.plots_dir):
        need.append(("matplotlib", f"clair {cmd}'s histograms"))
    return need


def _check_dependencies(args: argparse.Namespace) -> None:
    from .._optional import require

    for module, what in _dependencies(args):
        require(module, "clair", what=what)


def _formats(args: argparse.Namespace) -> tuple[str, ...]:
    return ("string", "messages") if args.format == "both" else (args.format,)


def _guard(fn: Any) -> Any:
    """Check the command's optional dependencies first; turn a missing one and input errors
    into one clear line and exit code 2, and an unreachable server into a message with exit
    code 1 (no traceback)."""

    def wrapped(args: argparse.Namespace) -> int:
        from .._optional import MissingDependency
        from .client import ServerUnreachableError
        from .io import ClairInputError

        try:
            _check_dependencies(args)
            return int(fn(args) or 0)
        except MissingDependency as e:
            print(f"apo-kernels clair {args.clair_command}: error: {e}", file=sys.stderr)
            return 2
        except ClairInputError as e:
            print(f"apo-kernels clair {args.clair_command}: error: {e}", file=sys.stderr)
            return 2
        except ServerUnreachableError as e:
            stats = e.stats
            step = ""
            if stats is not None:
                _print_stats(stats)
                step = f"{stats.step}: " if stats.step != args.clair_command else ""
            skipped = sum(n for r, n in (stats.failure_reasons if stats else {}).items()
                          if r.startswith("not attempted"))
            print(f"apo-kernels clair {args.clair_command}: error: {step}{e}\n"
                  f"  stopped early{f' ({skipped} item(s) not attempted)' if skipped else ''}."
                  " Check that the server is running and the URL is right, then rerun the "
                  "same command: finished items are kept, failed ones are retried.",
                  file=sys.stderr)
            return 1

    wrapped.__doc__ = fn.__doc__
    return wrapped


# ----------------------------------------------------------------------------- commands


def _cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import generate

    stats = generate(_read(args), args.out_dir, _target_backend(args),
                     prompt_field=args.prompt_field, response_field=args.response_field,
                     system_prompt=args.system_prompt, retry_failed=args.retry_failed,
                     progress=not args.no_progress, source=_source(args))
    _print_stats(stats)
    return 0 if stats.ok else 1


def _cmd_revise(args: argparse.Namespace) -> int:
    from .pipeline import revise
    from .prompts import load_template

    template = load_template(args.template)
    stats = revise(_read(args), args.out_dir, _reviser_backend(args), template=template,
                   prompt_field=args.prompt_field, response_field=args.response_field,
                   check_meta=not args.allow_meta, retry_failed=args.retry_failed,
                   progress=not args.no_progress, source=_source(args),
                   structured=args.structured)
    _print_stats(stats)
    return 0 if stats.ok else 1


def _cmd_build(args: argparse.Namespace) -> int:
    from .pipeline import build

    stats = build(_read(args), args.out_dir, formats=_formats(args),
                  prompt_field=args.prompt_field, keep_identical=args.keep_identical,
                  hf=not args.no_hf_dataset, source=_source(args))
    _print_stats(stats)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import build, generate, revise
    from .prompts import load_template
    from .report import contrastiveness_report, print_report, write_histograms, write_json

    template = load_template(args.template)  # fail on a bad template before any model call
    progress = not args.no_progress
    # Each step reads the previous step's output file, as when the steps are run one by one.
    records = _read(args)
    g = generate(records, args.out_dir, _target_backend(args),
                 prompt_field=args.prompt_field, response_field=args.response_field,
                 system_prompt=args.system_prompt, retry_failed=args.retry_failed,
                 progress=progress, source=_source(args))
    _print_stats(g, failures=False)
    if not g.ok:
        return _run_stopped(args, "generate", [g])
    gen_path = Path(args.out_dir) / "generations.jsonl"
    r = revise(_read_plain(gen_path), args.out_dir, _reviser_backend(args), template=template,
               check_meta=not args.allow_meta, retry_failed=args.retry_failed,
               progress=progress, source=str(gen_path), structured=args.structured)
    _print_stats(r, failures=False)
    if not r.ok:
        return _run_stopped(args, "revise", [g, r])
    rev_path = Path(args.out_dir) / "revisions.jsonl"
    rev_rows = _read_plain(rev_path)
    b = build(rev_rows, args.out_dir, formats=_formats(args), keep_identical=args.keep_identical,
              hf=not args.no_hf_dataset, source=str(rev_path))
    _print_stats(b)
    pairs = [(row["revision"], row["original"]) for row in rev_rows]
    reports = {"clair": contrastiveness_report(pairs)}
    write_json(reports, Path(args.out_dir) / "report.json")
    write_histograms(reports, Path(args.out_dir) / "plots")
    from rich.console import Console

    print_report(reports, Console(stderr=True))
    c = Console(stderr=True, soft_wrap=True)  # long reasons stay on one line
    for st in (g, r):  # the failures last, where they are seen
        _print_failures(st, c)
    return 0 if b.ok else 1


def _run_stopped(args: argparse.Namespace, step: str, steps: list[Any]) -> int:
    from rich.console import Console

    c = Console(stderr=True, soft_wrap=True)
    for st in steps:
        _print_failures(st, c)
    print(f"apo-kernels clair {args.clair_command}: error: {step} gave no usable result for "
          "any item; stopping before the next step", file=sys.stderr)
    return 1


def _read_plain(path: Path) -> list[dict[str, Any]]:
    from .io import read_records

    return read_records(path)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import (
        contrastiveness_report,
        load_pairs,
        print_report,
        write_histograms,
        write_json,
    )

    labels = list(args.label or [])
    if labels and len(labels) != len(args.inputs):
        raise _usage_error(f"--label: give one per input ({len(args.inputs)} inputs, "
                           f"{len(labels)} labels)")
    labels = labels or [Path(p).stem if Path(p).is_file() else Path(p).name
                        for p in args.inputs]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    reports = {}
    for lab, path in zip(labels, args.inputs, strict=True):
        pairs = load_pairs(path, split=args.split, chosen_field=args.chosen_field,
                           rejected_field=args.rejected_field)
        reports[lab] = contrastiveness_report(pairs)
    print_report(reports)
    if args.json:
        write_json(reports, args.json)
        print(f"report: {args.json}", file=sys.stderr)
    if args.plots_dir:
        for p in write_histograms(reports, args.plots_dir):
            print(f"plot: {p}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- registration


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``clair`` and its subcommands to the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "clair",
        help="make CLAIR preference pairs (answers minimally revised by a stronger model)",
        description="CLAIR (Contrastive Learning from AI Revisions): rejected = the target "
                    "model's answer, chosen = the reviser's minimal revision of it. Model steps "
                    "are resumable: rerun the same command after a crash.",
    )
    sub = parser.add_subparsers(dest="clair_command", required=True, metavar="STEP")

    p = sub.add_parser("generate", help="answers from the target model (rejected)")
    _add_io(p, response_default=None)
    _add_target(p)
    _add_client(p)
    p.set_defaults(func=_guard(_cmd_generate))

    p = sub.add_parser("revise", help="minimal revisions by the reviser (chosen)")
    _add_io(p, response_default="response")
    _add_reviser(p)
    _add_client(p)
    p.set_defaults(func=_guard(_cmd_revise))

    p = sub.add_parser("build", help="preference dataset from revisions (JSONL + HF datasets)")
    _add_io(p, response_default=None)
    _add_build(p)
    p.set_defaults(func=_guard(_cmd_build))

    p = sub.add_parser("run", help="generate + revise + build + report")
    _add_io(p, response_default=None)
    _add_target(p)
    _add_reviser(p)
    _add_client(p)
    _add_build(p)
    p.set_defaults(func=_guard(_cmd_run))

    p = sub.add_parser("report", help="contrastiveness of any preference dataset(s)")
    p.add_argument("inputs", nargs="+",
                   help="preference datasets (JSONL/JSON/parquet/HF datasets dir) to compare")
    p.add_argument("--label", action="append", help="name per input (repeat)")
    p.add_argument("--split")
    _add_report_fields(p)
    p.add_argument("--json", help="write per-pair and aggregate metrics to this JSON file")
    p.add_argument("--plots-dir", help="write histogram PNGs here")
    p.set_defaults(func=_guard(_cmd_report))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apo_kernels.clair.cli``: the clair commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="apo-kernels")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
