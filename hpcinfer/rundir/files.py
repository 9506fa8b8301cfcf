"""Writing and reading run-directory files safely: `atomic_write` / `atomic_write_json` /
`atomic_path` leave a file with either its old content or all of the new, never a part (a temp
file in the same directory, fsync, rename, fsync of the directory; `durable=False` skips the
fsyncs for progress records); on any failure (a full disk included) the temp file is removed.
`overwrite_in_place` is the last resort of a record that must be written on a full disk;
`read_json`; `tail` of a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


def atomic_write(path: str | os.PathLike, data: bytes | str, durable: bool = True) -> None:
    """Write `data` so that `path` holds either its old content or all of the new, never a part.
    durable=False skips the fsyncs: for progress records that a crash may leave a little stale."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: str | os.PathLike, obj: Any, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", durable)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temp path beside `path`; on success fsync it (durable) and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def overwrite_in_place(path: str | os.PathLike, data: str) -> None:
    """Rewrite an existing small file in place, padded with spaces to its old length (JSON allows
    trailing blanks): it needs no new blocks, so it works on a full disk where a temp file cannot
    be created. Not atomic: a reader may see a mix for an instant (readers of JSON records treat
    an unreadable one as absent). For a failing rank's record only (RunDir.write_rank)."""
    with open(path, "r+b") as f:
        old = os.fstat(f.fileno()).st_size
        raw = data.encode()
        f.write(raw + b" " * max(0, old - len(raw)))


def written_path(filename: Optional[str], default: str) -> str:
    """What an OSError's `filename` was being written: the target of an atomic write's temp file
    (`.<name>.<random>.tmp` -> `<name>`), the file itself, or `default` when it names none."""
    if not filename:
        return default
    p = Path(filename)
    if p.name.startswith(".") and p.name.endswith(".tmp"):
        return str(p.with_name(p.name[1:].rsplit(".", 2)[0]))
    return str(p)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def tail(path: str | os.PathLike, lines: int = 20) -> str:
    """The last lines of a log file, or '(no log)'."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"
