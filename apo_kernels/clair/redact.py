"""Keep API keys out of everything CLAIR writes or prints.

Servers echo what they were sent: OpenAI's 401 body says ``"Incorrect API key provided:
sk-..."``, proxies put request headers in their error pages, and httpx's own errors quote a
malformed header value. Error messages and raw bodies therefore go through a :class:`Redactor` before they are stored,
logged, raised or printed (reply text too, for the known key only). It replaces

- each known secret (the API key itself, and its JSON-escaped and URL-encoded forms),
- the value of any ``Authorization``/``api-key``/``x-api-key`` header and any ``Bearer`` token,
- anything that looks like an OpenAI-style key (``sk-...``, masked or not), since a server may
  echo a key it was given by someone else or a partly masked one,
- the password part of a URL (``https://user:secret@host``),

with ``[REDACTED]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

REDACTED = "[REDACTED]"

# "Bearer <token>" anywhere (headers, echoed request dumps, error pages).
_BEARER = re.compile(r"(?i)\b(bearer\s+)(?!\[REDACTED\])[^\s\"',;}\]]+")
# Header-style "Authorization: <value>" / "api-key=<value>" / JSON "x-api-key": "<value>".
_HEADER = re.compile(
    r"(?i)(\b(?:authorization|proxy-authorization|x-api-key|api[-_]key)[\"']?\s*[:=]\s*[\"']?)"
    r"(?!bearer\s)(?!\[REDACTED\])(?:(?:basic|digest|token|apikey|key)\s+)?[^\s\"',;}\]]+"
)
# OpenAI-style keys, whole or masked ("sk-proj-****abcd"); 6+ characters after the prefix so
# ordinary words with a "sk-" in them are left alone.
_KEYLIKE = re.compile(r"\b(?:sk|rk)-[A-Za-z0-9_\-*.]{6,}")
# user:password@ in a URL.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")


class Redactor:
    """Callable that strips secrets from strings, or from nested dicts/lists of them.

    Args:
        secrets: values to remove wherever they occur (None and very short values are
            ignored: a 1-3 character "key" would blank out ordinary text).
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms: set[str] = set()
        for s in secrets:
            if not s or len(s) < 4:
                continue
            forms.update({s, json.dumps(s)[1:-1], quote(s, safe="")})
        # Longest first, so a key that contains another secret is removed whole.
        self.secrets = sorted(forms, key=len, reverse=True)

    def known(self, value: str) -> str:
        """Only the known secrets replaced: for model replies, which become the dataset and may
        well talk about "Bearer tokens" or ``sk-...`` placeholders in earnest."""
        for s in self.secrets:
            if s in value:
                value = value.replace(s, REDACTED)
        return value

    def text(self, value: str) -> str:
        """``value`` with every secret and anything shaped like a credential replaced by
        ``[REDACTED]``: for error messages and raw error bodies."""
        value = self.known(value)
        value = _BEARER.sub(lambda m: m.group(1) + REDACTED, value)
        value = _HEADER.sub(lambda m: m.group(1) + REDACTED, value)
        value = _KEYLIKE.sub(REDACTED, value)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + "@", value)

    def __call__(self, value: Any) -> Any:
        """Redact a string, or every string inside dicts/lists/tuples (keys included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self(v) for v in value)
        return value


def safe_url(url: str) -> str:
    """A URL fit for messages: any ``user:password@`` part redacted."""
    return Redactor().text(url)
