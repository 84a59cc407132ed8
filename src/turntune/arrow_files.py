"""Records from columnar files: Parquet, and the Arrow folders the ``datasets`` library writes.

Each row is one record in any of the three shapes (a ``messages`` or ``conversations`` column,
``tools``, ``system``...), validated exactly as a JSONL line is. Sources are ``file:#i`` (i the
0-based row, as ``ds[i]`` and pandas count), so an error names the row to fix.

Arrow gives every row of a column the same struct type, so a key present in one message is
present, as null, in all of them (a ``weight`` on one reply would put ``weight: null`` on every
other message). Such nulls are dropped before validation: Arrow cannot tell a missing key from a
null one, and reading them as given would refuse every record (``bad_weight``) or count keys
nobody wrote (``ignored keys``).

Folders: ``save_to_disk`` writes ``state.json`` naming its ``data-XXXXX-of-YYYYY.arrow`` files
(Arrow IPC streams) in order; a ``DatasetDict`` writes ``dataset_dict.json`` and one such folder
per split (its ``train`` split is read; name another split's folder to read that one). A local
``datasets`` cache of a hub dataset (``~/.cache/huggingface/datasets/owner___name/...``) holds
``NAME-SPLIT[-XXXXX-of-YYYYY].arrow`` files; its ``train`` files are read in name order.
pyarrow is needed only here (``pip install pyarrow``).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from turntune.errors import DataError

_BATCH_ROWS = 1024  # rows turned into Python objects at a time


def _pyarrow(name: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Parquet and Arrow data needs pyarrow (pip install pyarrow)", source=name,
                        rule="unreadable_file") from None
    return pyarrow


def without_nulls(value: Any) -> Any:
    """``value`` with every null-valued key of every object dropped (module doc)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _rows(batches, name: str, start: int = 0) -> Iterator[tuple[str, Any]]:
    i = start
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{name}:#{i}", without_nulls(row)
            i += 1


def parquet_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    pa = _pyarrow(name)
    try:  # pre_buffer (pyarrow's default) keeps every row group read so far: 1.7 GB at 1 M records
        f = pa.parquet.ParquetFile(path, pre_buffer=False)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"not a readable Parquet file ({e}); re-export it", source=name,
                        rule="unreadable_file") from None
    yield from _rows(f.iter_batches(batch_size=_BATCH_ROWS), name)


def arrow_files(folder: Path, name: str) -> list[Path]:
    """The Arrow files of a ``datasets`` folder, in row order (module doc)."""
    state = folder / "state.json"
    if state.is_file():
        files = json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])
        return [folder / f["filename"] for f in files]
    splits = folder / "dataset_dict.json"
    if splits.is_file():
        names = json.loads(splits.read_text(encoding="utf-8")).get("splits", [])
        if "train" not in names:
            raise DataError(f"a DatasetDict without a train split (splits: {', '.join(names)}); give the folder "
                            "of the split to read", source=name, rule="unreadable_file")
        return arrow_files(folder / "train", f"{name}/train")
    found = sorted(p for p in folder.glob("*.arrow") if "-train" in p.name)
    if not found:
        raise DataError("a folder that is not a datasets folder (no state.json, dataset_dict.json or "
                        "*-train*.arrow files); give a data file or a save_to_disk folder", source=name,
                        rule="missing_file")
    return found


def folder_records(folder: Path, name: str) -> Iterator[tuple[str, Any]]:
    pa = _pyarrow(name)
    start = 0
    for path in arrow_files(folder, name):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path.name} is not a readable Arrow stream ({e})", source=name,
                            rule="unreadable_file") from None
        rows = 0
        for src, rec in _rows(reader, name, start):
            rows += 1
            yield src, rec
        start += rows
