"""Async client for OpenAI-compatible chat-completions servers (vLLM, TGI, llama.cpp server,
hosted APIs), built on httpx.

Faults are expected at scale, so the client retries what is worth retrying (HTTP 408/409/429/5xx,
timeouts, connection errors, a reply that is not the protocol's JSON) with exponential backoff and
jitter, honours ``Retry-After`` (and ``retry-after-ms``), limits the number of requests in flight,
and keeps token usage totals. :meth:`ChatClient.chat` never raises for a failed request: it
returns a :class:`ChatResult` with ``error`` and the raw body, so the pipeline can record it.

A failure is *transient* when it gave up on retryable transport faults (connection errors,
timeouts, 408/409/429/5xx): the same request may well succeed later, so the pipeline does not
count the item as done. It is *unreachable* when its last attempt could not connect, the server
has sent no reply to any request since this one lost contact with it, and every other request in
flight is failing to connect too: the server is gone (never started, or died in the middle of
the step). The request then ends without waiting out its retries once it has failed to connect
``RetryPolicy.gone_after`` times in a row, and the pipeline stops the whole run.

The API key never leaves the client in anything it returns: error messages, raw bodies and reply
text pass through :class:`~apo_kernels.clair.redact.Redactor` (servers echo keys in 401 bodies).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .._optional import require
from .redact import Redactor, safe_url

if TYPE_CHECKING:
    from typing_extensions import Self

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass
class RetryPolicy:
    """How failed attempts are retried.

    The delay before retry ``k`` (0-based) is drawn from ``[d/2, d]`` with
    ``d = min(backoff_max, backoff_base * 2**k)`` ("equal jitter": exponential, but spread so that
    many clients hit by the same outage do not come back in lockstep). A ``Retry-After`` header
    replaces that delay, capped at ``retry_after_max``.

    Retries ride out faults of a server that is up. A server that is gone is not waited for:
    once a request has failed to connect ``gone_after`` times in a row, with no reply from the
    server to anyone since it lost contact and every other request in flight failing to
    connect too, the request ends as *unreachable* before its retries are spent (and the
    pipeline stops the run).
    """

    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0
    gone_after: int = 2

    def delay(self, attempt: int, rng: random.Random) -> float:
        d = min(self.backoff_max, self.backoff_base * (2**attempt))
        return d / 2 + rng.uniform(0, d / 2)


@dataclass
class UsageTotals:
    """Counters over every request a client made."""

    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            v = usage.get(k)
            if isinstance(v, int):
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ChatResult:
    """One chat call's outcome after retries."""

    text: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None
    status: int | None = None
    raw: str | None = None  # the last raw body when the call failed
    transient: bool = False  # gave up on retryable transport faults: worth retrying later
    unreachable: bool = False  # ... and no request got any reply from the server meanwhile

    @property
    def ok(self) -> bool:
        return self.error is None


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, raw: str | None = None,
                 retry_after: float | None = None, *, transient: bool = True,
                 connect: bool = False):
        super().__init__(message)
        self.status, self.raw, self.retry_after = status, raw, retry_after
        self.transient = transient  # False: retried, but a permanent failure once given up
        self.connect = connect  # the server could not be reached (no connection made)


class ServerUnreachableError(RuntimeError):
    """The server could not be reached at all: raised by a backend to stop a run early.

    ``base_url`` is the server as configured, ``last_error`` the last request's error; the
    backend sets ``totals`` (its usage counters) before raising, and the pipeline ``stats``.
    """

    def __init__(self, base_url: str, last_error: str) -> None:
        base_url = safe_url(base_url)
        super().__init__(f"cannot reach the server at {base_url}: {last_error}")
        self.base_url, self.last_error = base_url, last_error
        self.totals: dict[str, int] = {}
        self.stats: Any = None


@dataclass(eq=False)
class _Flight:
    """One request between its first attempt and its result (backoff sleeps included)."""

    lost_since: float | None = None  # when its current run of reply-less attempts began
    connect_failed: bool = False  # its last finished attempt could not connect
    connect_streak: int = 0  # attempts in a row that could not connect


class _Fatal(Exception):
    def __init__(self, message: str, status: int | None = None, raw: str | None = None):
        super().__init__(message)
        self.status, self.raw = status, raw


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def chat_url(base_url: str) -> str:
    """``.../v1`` -> ``.../v1/chat/completions`` (a full endpoint URL is kept as given)."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(parts)
    return None


class ChatClient:
    """Chat-completions client with a concurrency limit, retries and usage totals.

    Use as ``async with ChatClient(...) as c: await c.chat(messages)``.

    Args:
        base_url: server root, e.g. ``http://localhost:8000/v1``.
        model: the ``model`` field of each request.
        api_key: sent as ``Authorization: Bearer``; None for servers without auth.
        concurrency: most requests in flight at once.
        timeout: seconds for one HTTP attempt (connect, read, write and pool each).
        retry: the :class:`RetryPolicy`.
        params: extra request fields (``temperature``, ``max_tokens``, ``seed``...).
        seed: seeds the jitter, for reproducible tests.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 16,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.url = chat_url(base_url)
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.totals = UsageTotals()
        self._rng = random.Random(seed)
        self._sem: asyncio.Semaphore | None = None
        self._http: Any = None
        self._last_reply: float | None = None  # monotonic time of the last HTTP response
        self._flights: set[_Flight] = set()  # requests not yet finished
        self.redact = Redactor([api_key])

    async def __aenter__(self) -> Self:
        httpx = require("httpx", "clair", what="CLAIR requests to a server")

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._sem = asyncio.Semaphore(self.concurrency)
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=self.concurrency,
                                max_keepalive_connections=self.concurrency),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _attempt(self, body: dict[str, Any]) -> ChatResult:
        import httpx

        assert self._sem is not None and self._http is not None, "use 'async with ChatClient'"
        async with self._sem:  # held for the HTTP exchange only, not during backoff sleeps
            self.totals.requests += 1
            try:
                resp = await self._http.post(self.url, json=body)
            except httpx.TimeoutException as e:
                raise _Retryable(f"timeout after {self.timeout:g}s ({type(e).__name__})",
                                 connect=isinstance(e, httpx.ConnectTimeout)) from None
            except httpx.TransportError as e:  # connect/read errors, dropped connections
                # httpx quotes an illegal header value (the key) in its message: redact.
                raise _Retryable(self.redact(f"connection error: {type(e).__name__}: {e}"),
                                 connect=isinstance(e, httpx.ConnectError)) from None
        self._last_reply = time.monotonic()
        raw = self.redact(resp.text)
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code}", resp.status_code, raw,
                             parse_retry_after(resp.headers))
        if resp.status_code >= 400:
            raise _Fatal(f"HTTP {resp.status_code}", resp.status_code, raw)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            # A 200 whose body is not the protocol (a proxy's error page, a cut-off stream)
            # is usually transient, so it is retried like a 5xx.
            # Once retries are spent it is a permanent failure: the server answers, just not
            # with the protocol, and would most likely answer the same way on a rerun.
            raise _Retryable("malformed reply (not a chat-completions JSON body)",
                             resp.status_code, raw, transient=False) from None
        text = _content_text(message.get("content") if isinstance(message, dict) else None)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        if text is None:
            raise _Fatal("reply has no message content", resp.status_code, raw)
        return ChatResult(text=self.redact.known(text), finish_reason=choice.get("finish_reason"),
                          usage=usage, status=resp.status_code)

    def _server_down(self, flight: _Flight) -> bool:
        """Whether the server looks gone from ``flight``'s point of view: no reply to anyone
        since ``flight`` lost contact, and every other request in flight failing to connect.
        (A request still waiting on a reply, or one the server answered since, means the
        server is alive, just slow or flaky.)"""
        if flight.lost_since is None:
            return False
        if self._last_reply is not None and self._last_reply >= flight.lost_since:
            return False
        return all(f.connect_failed for f in self._flights if f is not flight)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """Send one chat request, retrying per the policy. Never raises for request failures.

        ``params`` are extra request fields for this call (e.g. ``response_format``); None
        values are left out.
        """
        body = {"model": self.model, "messages": messages, **self.params,
                **{k: v for k, v in params.items() if v is not None}}
        flight = _Flight()
        self._flights.add(flight)
        try:
            return await self._chat(body, flight)
        finally:
            self._flights.discard(flight)

    async def _chat(self, body: dict[str, Any], flight: _Flight) -> ChatResult:
        attempt = 0
        while True:
            try:
                result = await self._attempt(body)
            except _Fatal as e:
                self.totals.failed += 1
                return ChatResult(attempts=attempt + 1, error=self.redact(str(e)),
                                  status=e.status, raw=e.raw)
            except _Retryable as e:
                if e.status is None:  # no HTTP reply at all
                    if flight.lost_since is None:
                        flight.lost_since = time.monotonic()
                else:
                    flight.lost_since = None
                flight.connect_failed = e.connect
                flight.connect_streak = flight.connect_streak + 1 if e.connect else 0
                spent = attempt >= self.retry.max_retries
                gone = e.connect and (spent or flight.connect_streak >= self.retry.gone_after)
                gone = gone and self._server_down(flight)
                if spent or gone:
                    self.totals.failed += 1
                    why = "; the server is not answering" if gone and not spent else ""
                    return ChatResult(attempts=attempt + 1,
                                      error=self.redact(f"{e} (gave up after {attempt + 1} "
                                                        f"attempts{why})"),
                                      status=e.status, raw=e.raw, transient=e.transient,
                                      unreachable=gone)
                if e.retry_after is not None:
                    wait = min(e.retry_after, self.retry.retry_after_max)
                else:
                    wait = self.retry.delay(attempt, self._rng)
                attempt += 1
                self.totals.retries += 1
                await asyncio.sleep(wait)
                continue
            result.attempts = attempt + 1
            self.totals.succeeded += 1
            self.totals.add_usage(result.usage)
            return result
