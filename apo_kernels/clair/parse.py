"""Parsing the reviser's reply into (rationale, revised answer).

Models follow formats loosely, so the parser accepts the variations seen in practice: tag case
and spacing, a reply wrapped in a code fence, a missing ``</revised_answer>`` when the model
simply stopped, a leftover "Revised answer:" label inside the tags, and plain headings
("**Revised answer:**") instead of tags. What it refuses, it refuses with a reason: no revision
marker, a reply cut off by the token limit, an empty revision, or one that talks about being a
revision. The caller records those as failures together with the raw text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REV_OPEN = re.compile(r"<\s*revised[_ ]answer\s*>", re.IGNORECASE)
_REV_CLOSE = re.compile(r"<\s*/\s*revised[_ ]answer\s*>", re.IGNORECASE)
_REASON_BLOCK = re.compile(
    r"<\s*reasoning\s*>(.*?)(?:<\s*/\s*reasoning\s*>|(?=<\s*revised[_ ]answer\s*>)|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_FENCE = re.compile(r"^\s*```[\w-]*\n(.*)\n```\s*$", re.DOTALL)
# A heading-style marker on its own line, used when the model drops the tags.
_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(?:revised|corrected|improved|final)[ \t]+"
    r"(?:answer|response)[ \t]*:?[ \t]*(?:\*\*|__)?[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_REASON_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(?:reasoning|analysis)[ \t]*:?[ \t]*"
    r"(?:\*\*|__)?[ \t]*:?[ \t]*\n",
    re.IGNORECASE | re.MULTILINE,
)
# A label the model repeats inside the answer block ("Revised answer: ...").
_LEADING_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:revised|corrected|improved)[ \t]+(?:answer|response)[ \t]*:(?:\*\*)?[ \t]*\n?",
    re.IGNORECASE,
)
# Phrases that betray the revision (the prompt forbids them). Kept narrow on purpose: ordinary
# answers say "correct" and "improve" all the time.
_META = re.compile(
    r"\b(?:the|your|this|my)\s+student'?s?\b"
    r"|\bstudent'?s\s+(?:answer|response|solution)\b"
    r"|\b(?:original|previous|earlier|initial)\s+(?:answer|response|solution|version)\b"
    r"|\b(?:revised|corrected|improved|updated)\s+(?:answer|response|solution|version)\b"
    r"|\bhere\s+is\s+the\s+(?:revised|corrected|improved)\b"
    r"|\bI\s+(?:have\s+)?(?:revised|corrected|edited|rewrote)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParseResult:
    """Outcome of parsing one reviser reply; ``ok`` is False with ``error`` set on failure."""

    ok: bool
    revision: str | None = None
    rationale: str = ""
    error: str | None = None

    @classmethod
    def fail(cls, error: str) -> ParseResult:
        return cls(ok=False, error=error)


def _clean_revision(text: str) -> str:
    text = _LEADING_LABEL.sub("", text, count=1)
    # A code fence inside the block is kept: answers may legitimately be code. Only blank lines
    # around the block go; leading spaces of the first line may be indentation and stay.
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()


def _rationale_from(text: str) -> str:
    m = _REASON_BLOCK.search(text)
    if m:
        return m.group(1).strip()
    text = _REASON_HEADING.sub("", text, count=1)
    return text.strip()


def _meta_reference(revision: str, context: str) -> str | None:
    """The first self-referring phrase in ``revision`` that the task or the original answer
    does not itself use (a question about students may well talk about "the student")."""
    ctx = context.lower()
    for m in _META.finditer(revision):
        phrase = m.group(0).lower()
        if phrase in ctx or ("student" in phrase and "student" in ctx):
            continue
        return m.group(0)
    return None


def parse_revision(
    raw: str | None, finish_reason: str | None = None, check_meta: bool = True,
    context: str = "",
) -> ParseResult:
    """Split a reviser reply into rationale and revision.

    Args:
        raw: the reviser's reply text.
        finish_reason: the API's ``finish_reason``; ``"length"`` means the reply was cut off,
            which makes an unclosed revision block a failure rather than a complete answer.
        check_meta: refuse revisions that refer to themselves as revisions or to a student.
        context: the task and the original answer; phrases they use are not held against the
            revision.
    """
    if raw is None or not raw.strip():
        return ParseResult.fail("empty reply")
    text = raw.replace("\r\n", "\n")
    fenced = _FENCE.match(text)
    if fenced and _REV_OPEN.search(fenced.group(1)):
        text = fenced.group(1)  # the whole reply wrapped in a code fence

    opens = list(_REV_OPEN.finditer(text))
    if opens:
        # The last block wins: models sometimes draft a revision, then write the final one.
        start = opens[-1]
        close = _REV_CLOSE.search(text, start.end())
        if close is None:
            if finish_reason == "length":
                return ParseResult.fail("reply truncated (finish_reason=length) before "
                                        "</revised_answer>")
            body = text[start.end():]
        else:
            body = text[start.end():close.start()]
        rationale = _rationale_from(text[: opens[0].start()])
    else:
        headings = list(_HEADING.finditer(text))
        if not headings:
            return ParseResult.fail("no <revised_answer> block or 'Revised answer:' heading")
        if finish_reason == "length":
            return ParseResult.fail("reply truncated (finish_reason=length)")
        start = headings[-1]
        body = text[start.end():]
        rationale = _rationale_from(text[: headings[0].start()])

    return finish_revision(body, rationale, check_meta, context)


def finish_revision(body: str, rationale: str, check_meta: bool = True,
                    context: str = "") -> ParseResult:
    """The checks every reply format shares, on the revision's text once it is found: clean
    it (a repeated "Revised answer:" label, blank lines around), refuse it when empty or when
    it refers to itself as a revision (``check_meta``; phrases ``context`` uses are fine)."""
    revision = _clean_revision(body)
    if not revision.strip():
        return ParseResult.fail("empty revised answer")
    if check_meta:
        phrase = _meta_reference(revision, context)
        if phrase is not None:
            return ParseResult.fail(f"revision refers to itself as a revision: {phrase!r}")
    return ParseResult(ok=True, revision=revision, rationale=rationale)
