"""Fixtures for the CLAIR tests (the server itself lives in clair_testlib)."""

from __future__ import annotations

import pytest
from clair_testlib import ChatServer


@pytest.fixture
def chat_server():
    with ChatServer() as s:
        yield s
