"""The reviser prompt.

The reviser plays a teacher who improves a student's answer as little as possible, writes its
reasoning first (so the edit is thought through before it is made) and then the whole corrected
answer between markers that :mod:`apo_kernels.clair.parse` looks for. The text is ours; the idea
is the CLAIR prompt of the APO paper.

A template is plain text with two placeholders, ``{{prompt}}`` and ``{{response}}``, replaced
literally: no format-string escaping, so templates may contain braces (JSON, code) freely.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .io import ClairInputError

PROMPT_PLACEHOLDER = "{{prompt}}"
RESPONSE_PLACEHOLDER = "{{response}}"

DEFAULT_TEMPLATE = """\
You are an experienced teacher. A student was given the task below and wrote the answer that \
follows it. Improve the answer with the smallest edits that make it correct, clear, complete and \
engaging, so that it is the answer an excellent student would have written.

<task>
{{prompt}}
</task>

<student_answer>
{{response}}
</student_answer>

How to revise:
- First check the answer carefully: wrong facts or calculations, faulty reasoning, missing \
steps, parts of the task it ignores, confusing wording, poor structure, a flat or unhelpful tone.
- Change only what needs to change. Every sentence, list item, code line and piece of formatting \
that is already good must be copied exactly as it is. Do not rephrase good text for style.
- Keep the student's approach, voice and length unless they are the problem.
- The corrected answer must read as a direct reply to the task. It must never mention a student, \
a teacher, an original or earlier answer, edits, corrections or this review.

Reply in exactly this format and write nothing outside it:
<reasoning>
What is wrong or weak in the answer and how you will fix each point (brief).
</reasoning>
<revised_answer>
The complete corrected answer, ready to be shown to the person who asked.
</revised_answer>
"""


@dataclass(frozen=True)
class RevisionTemplate:
    """A reviser prompt template and where it came from."""

    text: str
    source: str = "builtin"

    @property
    def sha256(self) -> str:
        """Hash of the template text: part of every revise key, so editing the template never
        reuses results made with the old one."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, prompt_text: str, response: str) -> str:
        """The reviser's user message for one (prompt, answer)."""
        # Split the template on its placeholders before inserting anything, so user text that
        # happens to contain "{{prompt}}" or "{{response}}" is never substituted itself.
        head, sep, tail = self.text.partition(RESPONSE_PLACEHOLDER)
        head = head.replace(PROMPT_PLACEHOLDER, prompt_text)
        tail = tail.replace(PROMPT_PLACEHOLDER, prompt_text)
        return head + (response if sep else "") + tail


def validate_template(text: str, source: str) -> RevisionTemplate:
    """Check a template has each placeholder exactly once."""
    for ph in (PROMPT_PLACEHOLDER, RESPONSE_PLACEHOLDER):
        n = text.count(ph)
        if n != 1:
            raise ClairInputError(
                f"reviser template {source}: placeholder {ph} must appear exactly once "
                f"(found {n})"
            )
    return RevisionTemplate(text=text, source=source)


def load_template(path: str | os.PathLike[str] | None = None) -> RevisionTemplate:
    """The built-in template, or the one in ``path`` (``--template``)."""
    if path is None:
        return RevisionTemplate(DEFAULT_TEMPLATE)
    p = Path(path)
    if not p.is_file():
        raise ClairInputError(f"--template: no file {str(p)!r}")
    return validate_template(p.read_text(encoding="utf-8"), str(p))
