"""The CLAIR steps: generate, revise, build.

Each model step works in an output directory::

    <step>.store.jsonl     append-only store of finished calls (the resume point; keep it)
    <outputs>.jsonl        the step's results in input order
    <step>.failures.jsonl  items that failed, with the error and the raw reply
    <step>.summary.json    counts and token usage

An item's key is the sha256 of its input (prompt, answer, step, model identity and sampling
settings, template hash, and which repeat of an identical input it is), so a rerun with the same
command skips finished items, and changing the model or the template never reuses stale ones.
Permanent failures (an unusable reply, HTTP 4xx other than 408/409/429...) count as finished
(a rerun does not hammer a server with the same bad request); ``retry_failed=True`` redoes them.
Transient failures (connection errors, timeouts, 429/5xx that outlasted the retries) are
recorded too, with ``transient: true``, but do not count as finished: a plain rerun retries them.

An input with no records, or none holding the prompt field, is a :class:`ClairInputError`. When
the server cannot be reached at all, a step writes its outputs for what it has and raises
:class:`~apo_kernels.clair.client.ServerUnreachableError` (with ``stats`` attached) instead of
failing every item one retry schedule at a time.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from .backends import Backend, Job, Reply
from .client import ServerUnreachableError
from .io import (
    ClairInputError,
    Prompt,
    as_messages,
    check_records,
    get_field,
    render_conversation,
    response_text,
    validate_prompt,
    write_hf_dataset,
    write_jsonl,
)
from .prompts import RevisionTemplate, load_template
from .redact import Redactor
from .store import JsonlStore, item_key
from .structured import StructuredPolicy, parse_reply

GENERATIONS = "generations.jsonl"
REVISIONS = "revisions.jsonl"


@dataclass
class StepStats:
    """What a step did."""

    step: str
    total: int = 0  # items in the input
    cached: int = 0  # found finished in the store
    ran: int = 0  # model calls made this run
    ok: int = 0  # items with a usable result (cached or new)
    failed: int = 0
    transient: int = 0  # failures worth retrying (not done: a plain rerun retries them)
    skipped: int = 0  # build: identical chosen/rejected; generate: existing answers used
    failure_reasons: dict[str, int] = field(default_factory=dict)  # error -> items, top first
    usage: dict[str, int] = field(default_factory=dict)  # this run's client totals
    stored_usage: dict[str, int] = field(default_factory=dict)  # over all stored items
    outputs: dict[str, str] = field(default_factory=dict)
    # revise: the reply format asked for and used ({"requested", "used", "fallback"?})
    structured: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    tqdm = require("tqdm.auto", "clair", what="CLAIR progress output").tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="item", disable=None if enabled else True,
                dynamic_ncols=True)


def _sum_usage(records: Sequence[dict[str, Any] | None]) -> dict[str, int]:
    tot: Counter[str] = Counter()
    for r in records:
        for k, v in ((r or {}).get("usage") or {}).items():
            if k in ("prompt_tokens", "completion_tokens", "total_tokens") and isinstance(v, int):
                tot[k] += v
    return dict(tot)


def _with_occurrence(contents: list[dict[str, Any]]) -> list[int]:
    """For each item, how many identical items came before it: repeats of one prompt are kept
    as separate samples instead of collapsing onto one key."""
    seen: Counter[str] = Counter()
    occ = []
    for c in contents:
        k = item_key(c)
        occ.append(seen[k])
        seen[k] += 1
    return occ


def _row_index(record: dict[str, Any], i: int) -> int:
    """The item's row in the original input: carried through the steps in ``index``, so a
    failure of any step points at the prompt the user wrote."""
    v = record.get("index")
    return v if isinstance(v, int) and not isinstance(v, bool) else i


def is_transient(rec: dict[str, Any] | None) -> bool:
    """Whether a stored record is a failure worth retrying (so not finished)."""
    if not rec or rec.get("error") is None:
        return False
    if "transient" in rec:
        return bool(rec["transient"])
    # Stores written before failures were classified: retries given up on anything but a
    # malformed body were transport faults.
    err = str(rec["error"])
    return "(gave up after" in err and not err.startswith("malformed reply")


def _needs_run(rec: dict[str, Any] | None, retry_failed: bool, usable: bool) -> bool:
    if rec is None or is_transient(rec):
        return True
    return retry_failed and not usable


NOT_ATTEMPTED = "not attempted: the run stopped early (server unreachable)"


def _finish_failures(stats: StepStats, failures: list[dict[str, Any]]) -> None:
    stats.transient = sum(1 for f in failures if f.get("transient"))
    reasons = Counter(str(f.get("error")) for f in failures)
    stats.failure_reasons = dict(reasons.most_common())


def _write_summary(out_dir: Path, stats: StepStats) -> None:
    path = out_dir / f"{stats.step}.summary.json"
    path.write_text(json.dumps(stats.as_dict(), indent=2) + "\n", encoding="utf-8")


def _redactor(backend: Backend) -> Redactor:
    """The backend's redactor (it knows the API key), or one for key-shaped text only."""
    r = getattr(backend, "redact", None)
    return r if isinstance(r, Redactor) else Redactor()


def _run_jobs(backend: Backend, jobs: list[Job], store: JsonlStore, step: str,
              extra: dict[str, dict[str, Any]], progress: bool,
              stats: StepStats, policy: Any = None) -> ServerUnreachableError | None:
    """Run jobs through the backend, appending each finished one to the store. Sets
    ``stats.usage`` and ``stats.ran``; returns the backend's unreachable-server error, if any,
    for the caller to raise once its outputs are written."""
    if not jobs:
        return None
    bar = _progress(len(jobs), step, progress)
    redact = _redactor(backend)

    def on_done(job: Job, reply: Reply) -> None:
        rec = {"key": job.key, "step": step, **extra[job.key], **job.meta, **asdict(reply)}
        # The client has redacted already; this covers any other backend. Reply text keeps
        # everything but the known key (it becomes the dataset).
        rec.update(error=redact(rec["error"]), raw=redact(rec["raw"]),
                   text=redact.known(rec["text"]) if rec["text"] else rec["text"])
        store.append(rec)
        stats.ran += 1
        bar.update(1)

    try:
        stats.usage = backend.run(jobs, on_done, policy).as_dict()
    except ServerUnreachableError as e:
        stats.usage = dict(e.totals)
        return e
    finally:
        bar.close()
    return None


# ----------------------------------------------------------------------------- generate


def _generate_ok(rec: dict[str, Any] | None) -> bool:
    return bool(rec) and rec.get("error") is None and bool((rec.get("text") or "").strip())


def generate(
    records: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    backend: Backend,
    *,
    prompt_field: str = "prompt",
    response_field: str | None = None,
    system_prompt: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    source: str = "input records",
) -> StepStats:
    """Answer each prompt with the target model (``rejected`` to be).

    Records that already hold a non-empty answer in ``response_field`` keep it and are not sent
    to the model. Writes ``generations.jsonl`` (``prompt``, ``response``, ``source``...) and
    ``generate.failures.jsonl`` in ``out_dir``. ``source`` names the input in errors.

    Raises:
        ClairInputError: no records, or none with ``prompt_field``, or a bad record.
        ServerUnreachableError: the server could not be reached (outputs are written first).
    """
    check_records(records, prompt_field, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = StepStats("generate", total=len(records))
    prompts: list[Prompt] = []
    existing: list[str | None] = []
    for i, r in enumerate(records):
        prompts.append(validate_prompt(get_field(r, prompt_field, i, "--prompt-field"),
                                       f"record {i} field {prompt_field!r}"))
        ans = response_text(r.get(response_field)) if response_field else None
        existing.append(ans if ans and ans.strip() else None)

    def full_prompt(p: Prompt) -> Prompt:
        if system_prompt and not (isinstance(p, list) and p[0]["role"] == "system"):
            return [{"role": "system", "content": system_prompt}, *as_messages(p)]
        return p

    ident = backend.identity()
    occ = _with_occurrence([{"prompt": p} for p in prompts])
    keys = [item_key({"step": "generate", "prompt": p, "system": system_prompt, "occurrence": o,
                      "model": ident}) for p, o in zip(prompts, occ, strict=True)]

    out_rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with JsonlStore(out / "generate.store.jsonl") as store:
        jobs, extra = [], {}
        for i, k in enumerate(keys):
            if existing[i] is not None:
                continue
            rec = store.get(k)
            if _needs_run(rec, retry_failed, _generate_ok(rec)):
                if k not in extra:  # an identical item twice: one call
                    jobs.append(Job(k, full_prompt(prompts[i])))
                    extra[k] = {"index": i, "prompt": prompts[i]}
            else:
                stats.cached += 1
        stopped = _run_jobs(backend, jobs, store, "generate", extra, progress, stats)
        model_name = ident.get("model")
        for i, k in enumerate(keys):
            base = {"index": i, "key": k, "prompt": prompts[i]}
            if existing[i] is not None:
                stats.skipped += 1
                stats.ok += 1
                out_rows.append({**base, "response": existing[i], "source": "input",
                                 "model": None, "finish_reason": None})
                continue
            rec = store.get(k)
            if _generate_ok(rec):
                stats.ok += 1
                out_rows.append({**base, "response": rec["text"], "source": "model",
                                 "model": model_name, "finish_reason": rec.get("finish_reason")})
            elif rec is None:  # only when the run stopped early
                stats.failed += 1
                failures.append({"step": "generate", **base, "error": NOT_ATTEMPTED,
                                 "status": None, "attempts": 0, "raw": None,
                                 "transient": True})
            else:
                stats.failed += 1
                failures.append({"step": "generate", **base,
                                 "error": rec.get("error") or "empty answer",
                                 "status": rec.get("status"),
                                 "attempts": rec.get("attempts"),
                                 "raw": rec.get("raw") if rec.get("error") else rec.get("text"),
                                 "transient": is_transient(rec)})
        stats.stored_usage = _sum_usage([store.get(k) for k in set(keys)])
    return _finish_step(out, stats, "generate", ("generations", GENERATIONS), out_rows, failures,
                        stopped, _redactor(backend))


# ----------------------------------------------------------------------------- revise


def revise(
    records: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    backend: Backend,
    *,
    template: RevisionTemplate | None = None,
    prompt_field: str = "prompt",
    response_field: str = "response",
    check_meta: bool = True,
    retry_failed: bool = False,
    progress: bool = True,
    source: str = "input records",
    structured: str = "auto",
) -> StepStats:
    """Ask the reviser to minimally improve each answer.

    The store keeps the reviser's raw replies; parsing happens when outputs are written, so a
    reply that cannot be parsed is a failure record holding the raw text (never a pair) and
    ``retry_failed`` redoes it. Writes ``revisions.jsonl`` (``prompt``, ``original``,
    ``revision``, ``rationale``) and ``revise.failures.jsonl``. ``source`` names the input in
    errors. ``structured`` (``auto``/``on``/``off``) asks a server for a JSON-schema reply
    (see :mod:`apo_kernels.clair.structured`); the choice is not part of an item's key, so a
    reply stored in either format is reused, and ``retry_failed`` redoes format failures after
    the mode is changed.

    Raises:
        ClairInputError: no records, or none with ``prompt_field``, or a bad record.
        ServerUnreachableError: the server could not be reached (outputs are written first).
    """
    check_records(records, prompt_field, source)
    template = template or load_template()
    texts: dict[str, tuple[str, str]] = {}  # key -> (task text, answer) for the reviser prompt

    def render(t: RevisionTemplate, job: Job) -> list[dict[str, str]]:
        return [{"role": "user", "content": t.render(*texts[job.key])}]

    policy = StructuredPolicy(structured, template, render,
                              server=backend.identity().get("backend") != "local")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = StepStats("revise", total=len(records))
    prompts: list[Prompt] = []
    answers: list[str] = []
    rows = [_row_index(r, i) for i, r in enumerate(records)]
    for i, r in enumerate(records):
        prompts.append(validate_prompt(get_field(r, prompt_field, i, "--prompt-field"),
                                       f"record {i} field {prompt_field!r}"))
        ans = response_text(get_field(r, response_field, i, "--response-field"))
        if ans is None or not ans.strip():
            raise ClairInputError(f"record {i}: field {response_field!r} holds no answer text "
                                  "(a string, or chat messages ending with an assistant turn)")
        answers.append(ans)

    ident = backend.identity()
    contents = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)]
    occ = _with_occurrence(contents)
    keys = [item_key({"step": "revise", **c, "occurrence": o, "model": ident,
                      "template": template.sha256}) for c, o in zip(contents, occ, strict=True)]

    def parsed(rec: dict[str, Any] | None, i: int) -> Any:
        if not rec or rec.get("error") is not None:
            return None
        return parse_reply(rec.get("text"), rec.get("format"), rec.get("finish_reason"),
                           check_meta=check_meta,
                           context=render_conversation(prompts[i]) + "\n" + answers[i])

    out_rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with JsonlStore(out / "revise.store.jsonl") as store:
        jobs, extra = [], {}
        for i, k in enumerate(keys):
            rec = store.get(k)
            pr = parsed(rec, i)
            if _needs_run(rec, retry_failed, bool(pr and pr.ok)):
                if k not in extra:
                    texts[k] = (render_conversation(prompts[i]), answers[i])
                    jobs.append(Job(k, render(template, Job(k, ""))))  # prepare() re-renders
                    extra[k] = {"index": rows[i]}
            else:
                stats.cached += 1
        stopped = _run_jobs(backend, jobs, store, "revise", extra, progress, stats, policy)
        if jobs:
            stats.structured = policy.describe()
        for i, k in enumerate(keys):
            rec = store.get(k)
            pr = parsed(rec, i)
            base = {"index": rows[i], "key": k, "prompt": prompts[i], "original": answers[i]}
            if pr is not None and pr.ok:
                stats.ok += 1
                out_rows.append({**base, "revision": pr.revision, "rationale": pr.rationale,
                                 "reviser": ident.get("model"), "template": template.source})
            else:
                stats.failed += 1
                if rec is None:  # only when the run stopped early
                    failures.append({"step": "revise", **base, "kind": "request",
                                     "error": NOT_ATTEMPTED, "status": None, "attempts": 0,
                                     "raw": None, "transient": True})
                elif rec.get("error") is not None:
                    failures.append({"step": "revise", **base, "kind": "request",
                                     "error": rec["error"], "status": rec.get("status"),
                                     "attempts": rec.get("attempts"), "raw": rec.get("raw"),
                                     "transient": is_transient(rec)})
                else:
                    failures.append({"step": "revise", **base, "kind": "parse",
                                     "error": pr.error if pr else "no reply",
                                     "status": rec.get("status"),
                                     "attempts": rec.get("attempts"), "raw": rec.get("text"),
                                     "finish_reason": rec.get("finish_reason"),
                                     "transient": False})
        stats.stored_usage = _sum_usage([store.get(k) for k in set(keys)])
    return _finish_step(out, stats, "revise", ("revisions", REVISIONS), out_rows, failures,
                        stopped, _redactor(backend))


def _finish_step(out, stats, step: str, output: tuple[str, str], rows: list, failures: list,
                 stopped, redact: Redactor):
    """Write a step's outputs, failures and summary; re-raise an early stop with the stats.

    ``output`` is ``(name in stats.outputs, file name)``. Failures are redacted again, for
    records a store written before redaction may still hold.
    """
    name, filename = output
    failures = [{**f, "error": redact(f.get("error")), "raw": redact(f.get("raw"))}
                for f in failures]
    failures_file = out / f"{step}.failures.jsonl"
    write_jsonl(out / filename, rows)
    write_jsonl(failures_file, failures)
    stats.outputs = {name: str(out / filename), "failures": str(failures_file)}
    _finish_failures(stats, failures)
    _write_summary(out, stats)
    if stopped is not None:
        stopped.stats = stats
        raise stopped
    return stats


# ----------------------------------------------------------------------------- build

FORMATS = ("string", "messages")


def pair_rows(prompt: Prompt, chosen: str, rejected: str, rationale: str,
              fmt: str) -> dict[str, Any]:
    """One preference row in TRL's standard (``string``) or conversational (``messages``)
    form."""
    if fmt == "string":
        return {"prompt": render_conversation(prompt), "chosen": chosen, "rejected": rejected,
                "rationale": rationale}
    if fmt == "messages":
        return {"prompt": as_messages(prompt),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rationale": rationale}
    raise ValueError(f"unknown format {fmt!r} (choose from {FORMATS})")


def build(
    records: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = FORMATS,
    prompt_field: str = "prompt",
    chosen_field: str = "revision",
    rejected_field: str = "original",
    rationale_field: str = "rationale",
    keep_identical: bool = False,
    hf: bool = True,
    source: str = "input records",
) -> StepStats:
    """Write the preference dataset: ``chosen`` = revision, ``rejected`` = original.

    Outputs, per form: ``pairs.jsonl`` + ``dataset/`` (plain strings) and
    ``pairs.messages.jsonl`` + ``dataset.messages/`` (chat messages). A pair whose revision
    equals the original carries no contrast; it is left out (listed in
    ``build.skipped.jsonl``) unless ``keep_identical``. Multi-turn prompts are flattened to a
    ``Role: content`` transcript in the plain-string form; train on the messages form then.
    ``source`` names the input in errors.
    """
    check_records(records, prompt_field, source)
    for f in formats:
        if f not in FORMATS:
            raise ClairInputError(f"--format: unknown form {f!r} (choose from {FORMATS})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = StepStats("build", total=len(records))
    rows: dict[str, list[dict[str, Any]]] = {f: [] for f in formats}
    skipped = []
    multi_turn = 0
    for i, r in enumerate(records):
        prompt = validate_prompt(get_field(r, prompt_field, i, "--prompt-field"),
                                 f"record {i} field {prompt_field!r}")
        chosen = response_text(get_field(r, chosen_field, i, "--chosen-field"))
        rejected = response_text(get_field(r, rejected_field, i, "--rejected-field"))
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ClairInputError(f"record {i}: {chosen_field!r} and {rejected_field!r} must "
                                  "be answer texts")
        rationale = r.get(rationale_field) or ""
        if chosen.strip() == rejected.strip() and not keep_identical:
            stats.skipped += 1
            skipped.append({"index": _row_index(r, i), "prompt": prompt, "response": rejected,
                            "reason": "revision identical to the original"})
            continue
        if isinstance(prompt, list) and not (len(prompt) == 1 and prompt[0]["role"] == "user"):
            multi_turn += 1
        for f in formats:
            rows[f].append(pair_rows(prompt, chosen, rejected, rationale, f))
        stats.ok += 1
    names = {"string": ("pairs.jsonl", "dataset"),
             "messages": ("pairs.messages.jsonl", "dataset.messages")}
    for f in formats:
        jl, ds = names[f]
        write_jsonl(out / jl, rows[f])
        stats.outputs[f"{f}_jsonl"] = str(out / jl)
        if hf:
            write_hf_dataset(out / ds, rows[f])
            stats.outputs[f"{f}_dataset"] = str(out / ds)
    write_jsonl(out / "build.skipped.jsonl", skipped)
    stats.outputs["skipped"] = str(out / "build.skipped.jsonl")
    if multi_turn and "string" in formats:
        stats.outputs["note"] = (f"{multi_turn} multi-turn prompt(s) were flattened to text in "
                                 "the plain-string form; prefer the messages form for them")
    _write_summary(out, stats)
    return stats
