"""Structured output for the reviser: a JSON schema where the server enforces it, the tagged
format where it does not.

Weak revisers ignore output formats written in a prompt (SmolLM2-135M on llama.cpp broke the
tagged format on 10 of 10 revisions). Servers with constrained decoding (vLLM, llama.cpp's
server, OpenAI, among others) accept ``response_format`` with a JSON schema and then *cannot*
produce anything else, so the reviser is asked for::

    {"reasoning": "...", "revised_answer": "..."}

(reasoning first, so a constrained decoder still writes the reasoning before the edit), with a
prompt that asks for that object instead of the tags. Modes (``--structured``):

- ``on``: always ask for JSON;
- ``off``: the tagged prompt only, no ``response_format``;
- ``auto`` (default): ask for JSON; once the server rejects ``response_format`` (an HTTP 4xx
  other than auth/not-found/rate-limit) or a reply is not the schema's object (a server that
  ignores the field), switch to the tagged format for the rest of the run, and send the item
  that showed it again in the tagged format (so no item is lost to the probe).

Each stored reply records the format it was asked in (``format``: ``json``/``tagged``), and is
parsed by that format; a JSON reply that is not the schema's object still gets a chance as a
tagged reply, and the other way round, since models sometimes answer in the format they know.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from .backends import Job, Reply
from .parse import ParseResult, finish_revision, parse_revision
from .prompts import DEFAULT_TEMPLATE, RevisionTemplate

MODES = ("auto", "on", "off")
JSON, TAGGED = "json", "tagged"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "revised_answer": {"type": "string"},
    },
    "required": ["reasoning", "revised_answer"],
    "additionalProperties": False,
}

RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "clair_revision", "strict": True, "schema": SCHEMA},
}

_FORMAT_SECTION = "Reply in exactly this format and write nothing outside it:"
JSON_INSTRUCTIONS = """\
Reply with one JSON object and nothing else, with these two string fields in this order:
{"reasoning": "What is wrong or weak in the answer and how you will fix each point (brief).",
 "revised_answer": "The complete corrected answer, ready to be shown to the person who asked."}
"""

# HTTP statuses that say nothing about response_format: auth, wrong URL/model, rate limits.
_NOT_A_FORMAT_REJECTION = frozenset({401, 402, 403, 404, 408, 409, 429})

_FENCE = re.compile(r"^\s*```[\w-]*\n(.*)\n```\s*$", re.DOTALL)


def json_template(template: RevisionTemplate) -> RevisionTemplate:
    """The template to send with the JSON schema.

    The built-in template's format section (the tags) is replaced by a description of the JSON
    object: asking for tags while the decoder is forced to write JSON would pull the model two
    ways. A custom template is sent as it is (describe the JSON fields in it, or use
    ``--structured off``).
    """
    if template.text != DEFAULT_TEMPLATE:
        return template
    head = template.text[: template.text.index(_FORMAT_SECTION)]
    return RevisionTemplate(head + JSON_INSTRUCTIONS, source=template.source)


def _json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in a reply: the whole text, a fenced block, or the span from the first
    ``{`` to the last ``}`` (models add a sentence around it when nothing enforces the
    schema)."""
    candidates = [text.strip()]
    fenced = _FENCE.match(text)
    if fenced:
        candidates.append(fenced.group(1).strip())
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        candidates.append(text[first:last + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_json_revision(raw: str | None, finish_reason: str | None = None,
                        check_meta: bool = True, context: str = "") -> ParseResult:
    """Parse a reply asked for with :data:`RESPONSE_FORMAT` into rationale and revision.

    Refuses, with a reason: an empty reply, a reply cut off by the token limit before the
    object closed, text that holds no JSON object, an object without a non-empty string
    ``revised_answer`` (``reasoning``, when present, must be a string), and, as
    :func:`~apo_kernels.clair.parse.parse_revision` does, a revision that refers to itself.
    """
    if raw is None or not raw.strip():
        return ParseResult.fail("empty reply")
    obj = _json_object(raw)
    if obj is None:
        if finish_reason == "length" and "{" in raw:
            return ParseResult.fail("reply truncated (finish_reason=length) before the JSON "
                                    "object closed")
        return ParseResult.fail("reply is not a JSON object with 'revised_answer'")
    revision = obj.get("revised_answer")
    reasoning = obj.get("reasoning", "")
    if not isinstance(revision, str) or not isinstance(reasoning, str):
        return ParseResult.fail("JSON reply: 'revised_answer' (and 'reasoning') must be "
                                "strings")
    return finish_revision(revision, reasoning.strip(), check_meta, context)


def is_format_error(result: ParseResult) -> bool:
    """Whether a failed parse means the format was not followed (as opposed to a reply cut off
    by the token limit, or a well-formed revision refused for its content)."""
    err = result.error or ""
    return not result.ok and not err.startswith(("reply truncated", "revision refers",
                                                 "empty revised answer"))


def parse_reply(raw: str | None, fmt: str | None, finish_reason: str | None = None,
                check_meta: bool = True, context: str = "") -> ParseResult:
    """Parse a stored reply by the format it was asked in (``None``: tagged, as stores written
    before structured output), trying the other format when the first is not followed."""
    first, second = ((parse_json_revision, parse_revision) if fmt == JSON
                     else (parse_revision, parse_json_revision))
    result = first(raw, finish_reason, check_meta=check_meta, context=context)
    if result.ok or not is_format_error(result):
        return result
    other = second(raw, finish_reason, check_meta=check_meta, context=context)
    if other.ok or not is_format_error(other):
        return other
    return result


@dataclass
class StructuredPolicy:
    """The :class:`~apo_kernels.clair.backends.JobPolicy` of a revise run.

    Args:
        mode: ``auto``, ``on`` or ``off``.
        template: the tagged template; the JSON one is derived with :func:`json_template`.
        render: ``render(template, job) -> prompt``, the reviser message of a job.
        server: False for a local backend (no ``response_format``): ``auto`` is then the
            tagged format from the start.
    """

    mode: str
    template: RevisionTemplate
    render: Any
    server: bool = True
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"structured: mode must be one of {MODES}, got {self.mode!r}")
        self.json_template = json_template(self.template)
        if self.mode == "auto" and not self.server:
            self.fallback_reason = "local model: no response_format"

    @property
    def use_json(self) -> bool:
        """Whether the next request asks for the JSON schema."""
        return self.mode == "on" or (self.mode == "auto" and self.fallback_reason is None)

    def prepare(self, job: Job) -> Job:
        if self.use_json:
            return replace(job, prompt=self.render(self.json_template, job),
                           params={**job.params, "response_format": RESPONSE_FORMAT},
                           meta={**job.meta, "format": JSON})
        params = {k: v for k, v in job.params.items() if k != "response_format"}
        return replace(job, prompt=self.render(self.template, job), params=params,
                       meta={**job.meta, "format": TAGGED})

    def review(self, job: Job, reply: Reply) -> Job | None:
        if self.mode != "auto" or job.meta.get("format") != JSON:
            return None
        if reply.error is not None:
            status = reply.status
            if (status is None or not 400 <= status < 500
                    or status in _NOT_A_FORMAT_REJECTION):
                return None
            reason = f"the server rejected response_format (HTTP {status})"
        else:
            parsed = parse_json_revision(reply.text, reply.finish_reason, check_meta=False)
            if parsed.ok or not is_format_error(parsed):
                return None
            reason = f"a reply did not follow the JSON schema ({parsed.error})"
        if self.fallback_reason is None:
            self.fallback_reason = reason
        if reply.error is None and parse_reply(reply.text, JSON, reply.finish_reason,
                                               check_meta=False).ok:
            return None  # usable as it is (the model wrote the tags): keep it
        return job  # prepare() now renders it in the tagged format

    def describe(self) -> dict[str, Any]:
        """What the run asked for, for the step's summary."""
        used = JSON if self.use_json else TAGGED
        d: dict[str, Any] = {"requested": self.mode, "used": used}
        if self.mode == "auto" and self.fallback_reason is not None:
            d["fallback"] = self.fallback_reason
        return d
