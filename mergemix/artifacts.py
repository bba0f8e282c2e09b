"""Atomic artifact I/O and content hashing.

Every file a run writes goes through a temporary file in the same directory and an `os.replace`, so a
killed run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergemix.errors import MergemixError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary path exists as an empty file; a caller writing a directory removes it first. Directories
    are written once, to a content-addressed name: where another process wrote a non-empty `path` first
    (two runs building the same cached base), its copy is kept and this one dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_UMASK)  # mkstemp makes 0600
        try:
            os.replace(tmp, path)
        except OSError as e:
            if not (os.path.isdir(tmp) and e.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def ensure_dir(path: str | Path, field: str) -> Path:
    """Directory `path`, created with its parents if need be. A path that cannot be a writable directory
    (a regular file in the way, no permission) is a MergemixError naming the recipe `field` that set it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergemixError(f"{field}: cannot create directory {path} ({e.strerror or e}); "
                            f"set {field} to a directory you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise MergemixError(f"{field}: directory {path} is not writable; set {field} to a directory you can write")
    return path


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON atomically (stable bytes for equal content)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it. A torn last line left by a killed writer is cut off first, so a
    line is either wholly in the log or not at all."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # only after a crash: find the end of the last whole line
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines log, dropping a torn last line left by a killed writer."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MergemixError(f"{path}:{lineno}: corrupt line ({e.msg}); delete that line to re-run it") from None
    return records


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


class Hasher:
    """Incremental sha256 over strings and bytes, for content hashes of corpora."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: str | bytes) -> Hasher:
        self._h.update(data.encode() if isinstance(data, str) else data)
        self._h.update(b"\0")
        return self

    def hexdigest(self, length: int = 16) -> str:
        return self._h.hexdigest()[:length]

    def update_sampled(self, path: str | Path, chunk: int = 1 << 20) -> Hasher:
        """Add a large file's identity without reading all of it: its name, size and sampled bytes (the
        first, middle and last `chunk` bytes). Hashing every byte of a multi-GB checkpoint would take minutes;
        a same-size fine-tune of the same architecture still differs in the sampled bytes."""
        path = Path(path)
        size = path.stat().st_size
        self.update(f"{path.name}:{size}")
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                f.seek(offset)
                self.update(f.read(chunk))
        return self
