"""Crash-safe, append-only JSONL store of finished items, keyed by a hash of their input.

Every finished item (success or failure) is one JSON line, flushed and fsynced before the next
is written, so a kill loses at most the item being written. On open, a truncated last line (the
kill's leftover) is cut off, so appending after it cannot glue two records together. The last
record of a key wins, which is how ``--retry-failed`` replaces a failure with a success.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self


def item_key(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    canon = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


class JsonlStore:
    """Records by key, loaded from and appended to one JSONL file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        self._f: Any = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = len(data)
        if data and not data.endswith(b"\n"):
            # A kill mid-write leaves a partial last line: drop it (that item is redone).
            end = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1  # corrupt line: skipped, its item will be redone
                continue
            self.records[key] = rec
        if self.bad_lines:
            print(f"warning: {self.path}: skipped {self.bad_lines} unreadable line(s)",
                  file=sys.stderr)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, record: dict[str, Any]) -> None:
        """Durably append one record (must have a ``key``)."""
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[record["key"]] = record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
