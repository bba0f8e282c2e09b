"""Readers for the local data a team has: jsonl/json, parquet, plain text globs, `datasets.save_to_disk`
directories, and the built-in offline corpora (`builtin:NAME`)."""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergemix.errors import MergemixError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", **{s: "text" for s in TEXT_SUFFIXES}}


def resolve_paths(source: str, cache_dir: Path) -> list[Path]:
    """Files (or one saved-dataset directory) named by `source`: a path, a glob, or `builtin:NAME`."""
    if source.startswith("builtin:"):
        from mergemix.data.builtin import materialize

        return [materialize(source.removeprefix("builtin:"), cache_dir)]
    if any(c in source for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).is_file() or _is_saved_dataset(Path(p)))
        if not paths:
            raise MergemixError(f"{source}: the glob matches no file")
        return paths
    path = Path(source)
    if not path.exists():
        raise MergemixError(f"{source}: no such file or directory")
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_FORMAT)
        if not paths:
            raise MergemixError(f"{source}: directory holds no .jsonl/.json/.parquet/.txt/.md file")
        return paths
    return [path]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
        path / "state.json"
    ).exists()


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "saved"
    return SUFFIX_FORMAT.get(path.suffix.lower(), "text")


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-empty line of a jsonl file; bad JSON names its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MergemixError(f"{path}:{lineno}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise MergemixError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def read_records(path: Path, fmt: str, not_utf8: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs from one file of any supported format; `location` is `file:line` or
    `file[row]`, for error messages. A plain-text document with bytes that are not UTF-8 is read with
    U+FFFD in their place and its location appended to `not_utf8` (a warning is logged where none is
    given); structured formats with such bytes are an error."""
    fmt = detect_format(path, fmt)
    try:
        if fmt == "jsonl":
            for lineno, rec in iter_json_records(path):
                yield f"{path}:{lineno}", rec
        elif fmt == "json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MergemixError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise MergemixError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
            for i, rec in enumerate(data):
                yield f"{path}[{i}]", rec
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except pa.ArrowException as e:
                raise MergemixError(f"{path}: not a readable parquet file ({e})") from None
            for i, rec in enumerate(rows):
                yield f"{path}[{i}]", rec
        elif fmt == "saved":
            yield from _read_saved(path)
        elif fmt == "text":
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                if not_utf8 is None:
                    log.warning("%s: bytes that are not UTF-8 were replaced by U+FFFD; re-encode it as UTF-8", path)
                else:
                    not_utf8.append(str(path))
            yield str(path), text
        else:
            raise MergemixError(f"{path}: unknown format {fmt!r}")
    except OSError as e:
        raise MergemixError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MergemixError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None


def _read_saved(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    from mergemix.progress import library_bars

    if not library_bars():
        datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a broken directory
        raise MergemixError(f"{path}: not a readable datasets.save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        log.info("%s: using split %r of %s", path, split, list(ds))
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"{path}[{i}]", rec


def read_texts(source: str, fmt: str, text_field: str, cache_dir: Path) -> list[str]:
    """Every document's text from `source`. Records without the text field are an error naming them."""
    texts: list[str] = []
    not_utf8: list[str] = []
    for path in resolve_paths(source, cache_dir):
        for where, rec in read_records(path, fmt, not_utf8):
            if isinstance(rec, str):
                texts.append(rec)
                continue
            if not isinstance(rec, dict) or text_field not in rec:
                keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                raise MergemixError(
                    f"{where}: no field {text_field!r} (found: {keys}); set text_field to the field holding the text"
                )
            value = rec[text_field]
            if not isinstance(value, str):
                raise MergemixError(f"{where}: field {text_field!r} is {type(value).__name__}, expected text")
            texts.append(value)
    if not_utf8:
        log.warning("%s: %d of %d documents had bytes that are not UTF-8, replaced by U+FFFD (first: %s); "
                    "re-encode them as UTF-8", source, len(not_utf8), len(texts), not_utf8[0])
    return texts
