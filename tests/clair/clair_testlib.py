"""A real chat-completions HTTP server on 127.0.0.1 for the CLAIR tests.

It plays both models with deterministic text: the ``student`` answers ``Qn`` with
``"Qn answer: teh total is {n+1}."``; the ``teacher`` reads that answer out of the reviser prompt
and fixes the spelling and the number. Faults are scripted per (model, n): a list of actions for
the first attempts, or one action for every attempt.

``schema``: what the server does with ``response_format``: ``"ignore"`` (like ``transformers
serve``: the teacher answers in tags whatever was asked), ``"honour"`` (like vLLM: the teacher
answers with the JSON object) or ``"reject"`` (HTTP 400, like a server without structured
output).

Run as a script (``python clair_testlib.py '{"always": {"student:3": "slow:5"}}'``) it serves
in its own process, prints its base URL, and runs until killed: a server that can die.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def student_answer(n: int) -> str:
    return f"Q{n} answer: teh total is {n + 1}."


def teacher_revision(answer: str, n: int) -> str:
    return answer.replace("teh", "the").replace(f"is {n + 1}", f"is {n}")


def teacher_reply(revision: str, n: int) -> str:
    return (f"<reasoning>\nFix the spelling and the total for Q{n}.\n</reasoning>\n"
            f"<revised_answer>\n{revision}\n</revised_answer>")


def teacher_json_reply(revision: str, n: int) -> str:
    return json.dumps({"reasoning": f"Fix the spelling and the total for Q{n}.",
                       "revised_answer": revision})


def key_echo_body(auth: str | None) -> str:
    """OpenAI's 401 body, which quotes the key it was sent."""
    key = (auth or "").removeprefix("Bearer ")
    return json.dumps({"error": {
        "message": f"Incorrect API key provided: {key}. You can find your API key at "
                   "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})


class ChatServer:
    """Scripted OpenAI-compatible server. ``faults[(model, n)]`` is a list of actions for the
    first attempts; ``always[(model, n)]`` an action for every attempt. Actions:
    ``"500"``/``"400"`` (status), ``"429:<s>"`` (429 with Retry-After), ``"slow:<s>"`` (sleep,
    then a normal reply), ``"drop"`` (close without a response), ``"badjson"`` (200, not JSON),
    ``"401echo"`` (401 whose body quotes the API key, as OpenAI's does),
    ``("content", text, finish_reason)`` (this reply text)."""

    def __init__(self, delay: float = 0.0, schema: str = "ignore") -> None:
        self.schema = schema
        self.faults: dict[tuple[str, int], list[Any]] = {}
        self.always: dict[tuple[str, int], Any] = {}
        self.delay = delay
        self.calls: list[dict[str, Any]] = []
        self.attempts: dict[tuple[str, int], int] = defaultdict(int)
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # http.server's method naming
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in the slow-reply case

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, model: str, n: int) -> int:
        return self.attempts[(model, n)]

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: str,
              headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    def _reply(self, model: str, n: int, messages: list[dict[str, str]],
               json_schema: bool) -> tuple[str, str]:
        if model == "student":
            return student_answer(n), "stop"
        ans = re.search(r"<student_answer>\n(.*)\n</student_answer>",
                        messages[-1]["content"], re.DOTALL).group(1)
        if json_schema:
            return teacher_json_reply(teacher_revision(ans, n), n), "stop"
        return teacher_reply(teacher_revision(ans, n), n), "stop"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        model, messages = body["model"], body["messages"]
        text = messages[-1]["content"]
        n = int(re.search(r"Q(\d+)", text).group(1))
        with self.lock:
            self.attempts[(model, n)] += 1
            attempt = self.attempts[(model, n)]
            self.calls.append({"model": model, "n": n, "attempt": attempt, "t": time.monotonic(),
                               "messages": messages, "body": body,
                               "auth": h.headers.get("Authorization")})
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            script = self.faults.get((model, n), [])
            action = script[attempt - 1] if attempt <= len(script) else self.always.get(
                (model, n))
            if self.delay:
                time.sleep(self.delay)
            asked = "response_format" in body
            if asked and self.schema == "reject" and action is None:
                self._send(h, 400, '{"error": "response_format is not supported"}')
                return
            content, finish = self._reply(model, n, messages,
                                          asked and self.schema == "honour")
            if isinstance(action, tuple) and action[0] == "content":
                _, content, finish = action
            elif action == "drop":
                h.close_connection = True
                return
            elif action == "401echo":
                self._send(h, 401, key_echo_body(h.headers.get("Authorization")))
                return
            elif action == "badjson":
                self._send(h, 200, "<html>gateway hiccup</html>")
                return
            elif isinstance(action, str) and action.startswith("429"):
                self._send(h, 429, '{"error": "slow down"}',
                           {"Retry-After": action.split(":")[1]})
                return
            elif action in ("500", "400"):
                self._send(h, int(action), f'{{"error": "scripted {action}"}}')
                return
            elif isinstance(action, str) and action.startswith("slow"):
                time.sleep(float(action.split(":")[1]))
            reply = {"id": "x", "object": "chat.completion", "model": model,
                     "choices": [{"index": 0, "finish_reason": finish,
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": USAGE}
            self._send(h, 200, json.dumps(reply))
        finally:
            with self.lock:
                self.inflight -= 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_forever(config: dict[str, Any]) -> None:
    """Serve until killed; ``config``: ``{"always": {"model:n": action}, "faults": {...}}``."""
    server = ChatServer(schema=config.get("schema", "ignore"))
    for name in ("always", "faults"):
        for k, v in config.get(name, {}).items():
            model, n = k.split(":")
            getattr(server, name)[(model, int(n))] = v
    with server:
        print(server.base_url, flush=True)
        server.thread.join()


if __name__ == "__main__":
    serve_forever(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
