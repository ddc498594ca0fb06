"""Where answers come from: an OpenAI-compatible server or a local HF model.

Both backends take a list of :class:`Job` and call ``on_done(job, reply)`` as each one finishes
(the pipeline stores it right there), and return usage totals for the run. The server backend
raises :class:`~apo_kernels.clair.client.ServerUnreachableError` (after reporting the failed
job) when the server cannot be reached at all, instead of failing every remaining job slowly.

An optional :class:`JobPolicy` decides each job's request when it is sent (not when it is
queued) and may ask for a reply to be replaced by another request: that is how structured
output falls back to the tagged format for the rest of a run (see
:mod:`apo_kernels.clair.structured`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .client import ChatClient, ChatResult, RetryPolicy, ServerUnreachableError, UsageTotals
from .io import Prompt, as_messages
from .redact import Redactor


@dataclass
class Job:
    """One model call: a key for the store, the prompt to send, extra request fields
    (``params``, e.g. ``response_format``) and fields stored with its reply (``meta``)."""

    key: str
    prompt: Prompt
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """A model call's outcome, the same for every backend."""

    text: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    error: str | None = None
    status: int | None = None
    raw: str | None = None
    transient: bool = False  # a retryable fault outlasted the retries: not done, retry later

    @classmethod
    def from_chat(cls, r: ChatResult) -> Reply:
        return cls(text=r.text, finish_reason=r.finish_reason, usage=r.usage,
                   attempts=r.attempts, error=r.error, status=r.status, raw=r.raw,
                   transient=r.transient)


OnDone = Callable[[Job, Reply], None]


class JobPolicy(Protocol):
    """Chooses a job's request as it is sent, and may replace a reply with another request."""

    def prepare(self, job: Job) -> Job:
        """The job as it should be sent now."""
        ...

    def review(self, job: Job, reply: Reply) -> Job | None:
        """A job to send instead of keeping ``reply`` (the reply is then dropped), or None."""
        ...


class Backend(Protocol):
    """What the pipeline needs from a model."""

    def identity(self) -> dict[str, Any]:
        """What determines the answers (model and sampling settings): part of each key."""
        ...

    def run(self, jobs: Sequence[Job], on_done: OnDone,
            policy: JobPolicy | None = None) -> UsageTotals: ...


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions server, called concurrently."""

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
        self.base_url, self.model, self.api_key = base_url, model, api_key
        self.concurrency, self.timeout = concurrency, timeout
        self.retry = retry or RetryPolicy()
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.seed = seed
        self.redact = Redactor([api_key])

    def identity(self) -> dict[str, Any]:
        # The server URL is left out on purpose: the same model behind another endpoint (a
        # restarted vLLM on a new port) should reuse finished work.
        return {"backend": "openai", "model": self.model, "params": self.params}

    def run(self, jobs: Sequence[Job], on_done: OnDone,
            policy: JobPolicy | None = None) -> UsageTotals:
        return asyncio.run(self._run(list(jobs), on_done, policy))

    async def _run(self, jobs: list[Job], on_done: OnDone,
                   policy: JobPolicy | None) -> UsageTotals:
        client = ChatClient(self.base_url, self.model, self.api_key,
                            concurrency=self.concurrency, timeout=self.timeout,
                            retry=self.retry, params=self.params, seed=self.seed)
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)

        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                while True:
                    if policy is not None:
                        job = policy.prepare(job)
                    result = await client.chat(as_messages(job.prompt), **job.params)
                    redo = policy.review(job, Reply.from_chat(result)) if policy else None
                    if redo is None:
                        break
                    job = redo
                on_done(job, Reply.from_chat(result))  # runs on the loop thread: no locking
                if result.unreachable:  # stops the other workers too (see below)
                    raise ServerUnreachableError(self.base_url, result.error or "no reply")

        async with client:
            tasks = [asyncio.create_task(worker())
                     for _ in range(min(self.concurrency, len(jobs)))]
            try:
                await asyncio.gather(*tasks)
            except BaseException as e:
                # One failure (e.g. the disk is full, the server is gone) stops everyone: cancel
                # before the client closes under requests still in flight.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if isinstance(e, ServerUnreachableError):
                    e.totals = client.totals.as_dict()
                raise
        return client.totals


class LocalBackend:
    """A local transformers model (see :class:`~apo_kernels.clair.local.LocalGenerator`)."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def identity(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.generator.name,
                "params": self.generator.params()}

    def run(self, jobs: Sequence[Job], on_done: OnDone,
            policy: JobPolicy | None = None) -> UsageTotals:
        totals = UsageTotals()
        # Local generation has no response_format: the policy only picks the prompt, once,
        # since every job is rendered before the first batch.
        jobs = [policy.prepare(j) for j in jobs] if policy is not None else list(jobs)

        def on_batch(indices: list[int], results: list[Any]) -> None:
            for i, r in zip(indices, results, strict=True):
                totals.requests += 1
                totals.succeeded += 1
                totals.add_usage(r.usage)
                on_done(jobs[i], Reply(text=r.text, finish_reason=r.finish_reason,
                                       usage=r.usage))

        self.generator.generate([j.prompt for j in jobs], on_batch=on_batch)
        return totals
