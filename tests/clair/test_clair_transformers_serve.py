"""CLAIR revise against a real OpenAI-compatible server that is not ours: ``transformers serve``
with a tiny random model saved locally (offline).

``transformers serve`` accepts ``response_format`` but ignores it (it logs "Ignoring unsupported
fields in the request: {'response_format'}"), like any server without constrained decoding, and
its random model writes neither JSON nor tags: the pipeline must send the schema, record the
replies as format failures, fall back (``auto``) and never crash. Content is not asserted. A
small recording proxy in front of the server shows what each request carried.
Needs fastapi, uvicorn and openai (``pip install 'apo-kernels[clair-test]'``, the same as
``transformers[serving]``); skipped with the reason without them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
for _mod in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_mod, reason=f"transformers serve needs {_mod} "
                                     "(pip install 'apo-kernels[clair-test]')")

from tiny_model import tiny_model_dir

from apo_kernels.clair.cli import main
from apo_kernels.clair.io import read_records

START_TIMEOUT = 120.0  # imports alone take 10-40 s on a loaded 2-core machine
N = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    if exe.exists():
        return [str(exe), "serve"]
    return [sys.executable, "-m", "transformers.cli.transformers", "serve"]


class RecordingProxy:
    """Forwards POSTs to ``upstream`` unchanged and keeps each request body."""

    def __init__(self, upstream: str) -> None:
        import httpx

        self.bodies: list[dict[str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # http.server's method naming
                data = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.bodies.append(json.loads(data))
                r = httpx.post(upstream + self.path, content=data, timeout=60,
                               headers={"Content-Type": "application/json"})
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tf_server(tmp_path_factory):
    """``transformers serve <tiny model dir>`` on a free port; yields (base URL, model, log)."""
    import httpx

    model = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    with log_path.open("w") as log:
        proc = subprocess.Popen([*serve_command(), str(model), "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu", "--default-seed", "0",
                                 "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.skip(f"transformers serve exited ({proc.returncode}): "
                            f"{log_path.read_text()[-500:]}")
            try:  # /health, not /v1/models (which answers 500 in transformers 5.23)
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"transformers serve did not start in {START_TIMEOUT:g} s: "
                            f"{log_path.read_text()[-500:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", str(model), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_revise_against_transformers_serve(mode, tf_server, tmp_path, capsys):
    upstream, model, log_path = tf_server
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"what is the sum of {w} and two",
                                       "response": f"it is {w}"}) + "\n"
                           for w in ("three", "four", "five")[:N]))
    out = tmp_path / "o"
    proxy = RecordingProxy(upstream)
    try:
        rc = main(["clair", "revise", "-i", str(inp), "-o", str(out), "--reviser-model", model,
                   "--reviser-base-url", proxy.base_url, "--reviser-max-tokens", "8",
                   "--structured", mode, "--concurrency", "1", "--timeout", "30",
                   "--max-retries", "1", "--no-progress"])
    finally:
        proxy.close()
    err = capsys.readouterr().err
    # The server answered every request with a real chat-completions reply.
    store = [json.loads(x) for x in (out / "revise.store.jsonl").read_text().splitlines()]
    assert len(store) == N
    assert all(r["error"] is None and r["status"] == 200 for r in store), store
    assert all(isinstance(r["text"], str) for r in store)
    # The requests carried the JSON schema (and the server, ignoring it, said so in its log).
    asked = [b.get("response_format", {}).get("type") for b in proxy.bodies]
    assert asked[0] == "json_schema"
    assert "Ignoring unsupported fields in the request: {'response_format'}" in (
        log_path.read_text())
    # Every reply was handled: parsed into a revision, or recorded as a format failure.
    summary = json.loads((out / "revise.summary.json").read_text())
    revisions = read_records(out / "revisions.jsonl")
    fails = read_records(out / "revise.failures.jsonl")
    assert summary["total"] == N and len(revisions) + len(fails) == N
    assert all(f["kind"] == "parse" and f["raw"] is not None for f in fails)
    assert rc == (0 if revisions else 1)
    assert "Traceback" not in err
    if mode == "on":
        assert asked == ["json_schema"] * N
        assert {r["format"] for r in store} == {"json"}
        assert summary["structured"] == {"requested": "on", "used": "json"}
    else:
        # The first reply was not the schema's object: that item is sent again, tagged, and so
        # is the rest of the run.
        assert asked == ["json_schema"] + [None] * N
        assert {r["format"] for r in store} == {"tagged"}
        assert summary["structured"]["used"] == "tagged"
        assert summary["structured"]["fallback"].startswith(
            "a reply did not follow the JSON schema")
