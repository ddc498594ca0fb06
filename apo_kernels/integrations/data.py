"""Load a preference dataset from disk: JSONL / JSON / parquet files or an HF ``datasets`` directory.

Records need ``prompt``, ``chosen`` and ``rejected`` (strings or chat messages), or chosen and
rejected conversations sharing their prompt turns. Extra columns (e.g. CLAIR's ``rationale``)
are kept and ignored by the collator.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .._optional import require
from .collator import REQUIRED_FIELDS

__all__ = ["TINY_DATASET", "identical_pairs", "load_preference_dataset", "tiny_dataset_path"]

TINY_DATASET = "tiny_preferences.jsonl"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def tiny_dataset_path() -> Path:
    """The small preference dataset shipped with the package (48 CLAIR-style pairs)."""
    return Path(str(resources.files("apo_kernels") / "data" / TINY_DATASET))


def _check_columns(ds: Any, path: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"the preference dataset {path} is empty: nothing to train on")
    cols = set(ds.column_names)
    missing = [f for f in REQUIRED_FIELDS if f not in cols]
    if missing and not (missing == ["prompt"] and {"chosen", "rejected"} <= cols):
        raise ValueError(
            f"the preference dataset {path} has no field(s) {missing}: records need `prompt`, "
            f"`chosen` and `rejected` (strings or chat messages); its fields are {sorted(cols)}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_json_lines(p: Path) -> None:
    """Raise a ``ValueError`` naming ``p`` and the line of the first record that is not a JSON object.

    ``datasets`` reports a malformed line as a multi-screen ``DatasetGenerationError`` without the
    line number; this pass reads the file once, a line at a time (no whole-file copy in memory).
    """
    records = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{str(p)!r} line {lineno} is not UTF-8 text: is it a binary file? "
                                 f"(`--dataset` wants JSON lines)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(p)!r} line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(  # noqa: TRY004 - bad input data, reported like every other data error
                    f"{str(p)!r} line {lineno} is a JSON {type(record).__name__}, not an object "
                    f"with prompt/chosen/rejected")
            records += 1
    if records == 0:
        raise ValueError(f"the preference dataset {str(p)!r} is empty (blank lines only): nothing to train on")


def _check_json(p: Path) -> None:
    """A ``.json`` file: one JSON document (a list of records, or an object), or JSON lines."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        lineno = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(f"{str(p)!r} line {lineno} is not UTF-8 text: is it a binary file?") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # more than one document: JSON lines in a .json file
            _check_json_lines(p)
            return
        raise ValueError(f"{str(p)!r} line {exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno})") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars ("Generating train split") and its log lines while we
    load, restoring the caller's settings after; any failure is re-raised as one line by us."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def identical_pairs(ds: Any) -> int:
    """How many records of a preference dataset have ``chosen`` equal to ``rejected``.

    Such a pair carries no preference: DPO's and APO-zero's gradients for it are exactly zero, and
    it usually means a data bug (e.g. a reviser that returned the answer unchanged).
    """
    return sum(1 for c, r in zip(ds["chosen"], ds["rejected"]) if c == r)


def load_preference_dataset(path: str | Path, *, split: str | None = None) -> Any:
    """A ``datasets.Dataset`` of preference records from ``path``.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file, or a directory written by
            ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (e.g. CLAIR's
            ``clair_out/dataset.messages``).
        split: the split of a ``DatasetDict`` (default: ``train``, or its only split).

    Raises:
        FileNotFoundError: no such file or directory.
        ValueError: unknown file type, a file that is not valid JSON lines / JSON / parquet (the
            message names the file and, for JSON, the first bad line), a missing split or field,
            or no records.
        MissingDependency: ``datasets`` is not installed (the message names the extra).
    """
    datasets = require("datasets", "trl", "loading a preference dataset", load=True)

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no preference dataset at {str(p)!r} (`--dataset`)")
    if p.is_dir():
        try:
            with _quiet_datasets():
                ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"cannot read the dataset directory {str(p)!r} (written by `save_to_disk`?): "
                             f"{_first_line(exc)}") from None
    else:
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(f"unknown dataset file type {p.suffix!r} for {str(p)!r}: use .jsonl, .json or .parquet")
        if p.stat().st_size == 0:
            raise ValueError(f"the preference dataset {str(p)!r} is empty: nothing to train on")
        if p.suffix.lower() == ".jsonl":
            _check_json_lines(p)
        elif p.suffix.lower() == ".json":
            _check_json(p)
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types; the cause is what helps
            cause = exc.__cause__ or exc  # DatasetGenerationError wraps the real error
            raise ValueError(f"cannot read {str(p)!r} as {p.suffix.lower()[1:]}: {_first_line(cause)}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        chosen = split or ("train" if "train" in ds else (names[0] if len(names) == 1 else None))
        if chosen not in ds:
            raise ValueError(f"{str(p)!r} holds the splits {names}; pick one with `split` (`--split`)")
        ds = ds[chosen]
    elif split not in (None, "train"):
        raise ValueError(f"{str(p)!r} is a single dataset without splits; drop `split` ({split!r})")
    _check_columns(ds, repr(str(p)))
    return ds
