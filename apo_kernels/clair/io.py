"""Reading prompt/preference files and writing datasets.

Inputs may be JSONL, JSON (a list of objects, or an object holding one such list), parquet, or
an HF ``datasets`` directory written by ``save_to_disk``. A prompt is a string or a list of chat
messages (``{"role": ..., "content": ...}``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._optional import require

Prompt = str | list[dict[str, Any]]


class ClairInputError(ValueError):
    """A problem with the user's input file or arguments (reported without a traceback)."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClairInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ClairInputError(f"{path}:{lineno}: expected a JSON object per line")
            records.append(obj)
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ClairInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(obj, dict):
        # Accept {"data": [...]} and similar wrappers with exactly one list of objects.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ClairInputError(
                f"{path}: expected a list of objects, or an object with exactly one list "
                f"(found keys {sorted(obj)})"
            )
        obj = lists[0]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise ClairInputError(f"{path}: expected a list of JSON objects")
    return obj


def _read_hf_dir(path: Path, split: str | None) -> list[dict[str, Any]]:
    datasets = require("datasets", "clair", what="reading an HF datasets directory")

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            elif "train" in ds:
                split = "train"
            else:
                raise ClairInputError(
                    f"{path}: a DatasetDict with splits {sorted(ds)}; choose one with --split"
                )
        if split not in ds:
            raise ClairInputError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    return ds.to_list()


def read_records(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """Read every record of a JSONL/JSON/parquet file or an HF ``datasets`` directory."""
    p = Path(path)
    if not p.exists():
        raise ClairInputError(f"input {str(p)!r} does not exist")
    if p.is_dir():
        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            raise ClairInputError(
                f"{p} is a directory but not an HF datasets directory (no dataset_info.json or "
                "dataset_dict.json; write one with Dataset.save_to_disk)"
            )
        return _read_hf_dir(p, split)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix in (".parquet", ".pq"):
        pq = require("pyarrow.parquet", "clair", what="reading parquet")

        return pq.read_table(p).to_pylist()
    raise ClairInputError(
        f"{p}: unknown input format {suffix!r} (use .jsonl, .json, .parquet or an HF datasets "
        "directory)"
    )


def check_records(records: Sequence[dict[str, Any]], field: str, source: str,
                  arg: str = "--prompt-field") -> None:
    """Refuse an input with nothing to do: no records at all, or no record holding ``field``
    (a wrong field name would otherwise surface as one error per record, or as 0 items)."""
    if not records:
        raise ClairInputError(f"{source}: no records (the input is empty)")
    if not any(isinstance(r, dict) and field in r for r in records):
        found = sorted({str(k) for r in records if isinstance(r, dict) for k in r})
        more = f" and {len(found) - 20} more" if len(found) > 20 else ""
        raise ClairInputError(f"{source}: no field {field!r} in any record (set it with "
                              f"{arg}); fields found: {found[:20]}{more}")


def validate_prompt(value: Any, where: str) -> Prompt:
    """Check that ``value`` is a non-empty string or a list of chat messages and return it."""
    if isinstance(value, str):
        if not value.strip():
            raise ClairInputError(f"{where}: empty prompt")
        return value
    if isinstance(value, list) and value:
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ClairInputError(
                    f"{where}: message {i} must be an object with 'role' and 'content'"
                )
            if not isinstance(m["content"], str):
                raise ClairInputError(f"{where}: message {i} content must be a string")
            # Keep only role/content: HF datasets pad struct columns with null keys.
            messages.append({"role": str(m["role"]), "content": m["content"]})
        return messages
    raise ClairInputError(
        f"{where}: a prompt must be a string or a non-empty list of chat messages, "
        f"got {type(value).__name__}"
    )


def get_field(record: dict[str, Any], field: str, index: int, arg: str) -> Any:
    """Return ``record[field]`` or raise an error naming the argument and the fields found."""
    if field not in record:
        raise ClairInputError(
            f"record {index} has no field {field!r} (set it with {arg}); fields found: "
            f"{sorted(record)}"
        )
    return record[field]


def response_text(value: Any) -> str | None:
    """An answer given as a string or as chat messages (the last assistant turn's content)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for m in reversed(value):
            if isinstance(m, dict) and m.get("role") == "assistant":
                return m.get("content")
        return None
    return None


def render_conversation(prompt: Prompt) -> str:
    """Plain text for a prompt: the string itself, a lone user turn's content, or a
    ``Role: content`` transcript for a multi-turn conversation."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages for a prompt (a string becomes one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically (temp file + rename), so a kill never leaves half a
    file where a finished one was expected. Returns the number written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_hf_dataset(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """Write records as an HF ``datasets`` directory (``datasets.load_from_disk`` reads it)."""
    import shutil

    datasets = require("datasets", "clair",
                       what="writing an HF datasets directory (or pass --no-hf-dataset)")

    p = Path(path)
    if records:
        ds = datasets.Dataset.from_list(list(records))
    else:
        ds = datasets.Dataset.from_dict({k: [] for k in ("prompt", "chosen", "rejected")})
    # save_to_disk refuses to overwrite in place safely; write beside it and swap.
    tmp = p.with_name(f".{p.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # One line of summary is enough; datasets' per-shard bars would clutter the step output.
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()
    if p.exists():
        shutil.rmtree(p)
    os.replace(tmp, p)
