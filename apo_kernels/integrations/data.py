"""Load a preference dataset from disk: JSONL / JSON / parquet files or an HF ``datasets`` directory.

Records need ``prompt``, ``chosen`` and ``rejected`` (strings or chat messages), or chosen and
rejected conversations sharing their prompt turns. Extra columns (e.g. CLAIR's ``rationale``)
are kept and ignored by the collator.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .collator import REQUIRED_FIELDS

__all__ = ["TINY_DATASET", "load_preference_dataset", "tiny_dataset_path"]

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


def load_preference_dataset(path: str | Path, *, split: str | None = None) -> Any:
    """A ``datasets.Dataset`` of preference records from ``path``.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file, or a directory written by
            ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (e.g. CLAIR's
            ``clair_out/dataset.messages``).
        split: the split of a ``DatasetDict`` (default: ``train``, or its only split).

    Raises:
        FileNotFoundError: no such file or directory.
        ValueError: unknown file type, a missing split or field, or no records.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no preference dataset at {str(p)!r} (`--dataset`)")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    else:
        builder = _FILE_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(f"unknown dataset file type {p.suffix!r} for {str(p)!r}: use .jsonl, .json or .parquet")
        if p.stat().st_size == 0:
            raise ValueError(f"the preference dataset {str(p)!r} is empty: nothing to train on")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
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
