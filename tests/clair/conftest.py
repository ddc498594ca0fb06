"""Fixtures for the CLAIR tests (the server itself lives in clair_testlib)."""

from __future__ import annotations

import socket

import pytest
from clair_testlib import ChatServer


@pytest.fixture
def chat_server():
    with ChatServer() as s:
        yield s


@pytest.fixture
def dead_url():
    """A port on 127.0.0.1 with nothing listening (bound, so no one else takes it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    finally:
        s.close()
