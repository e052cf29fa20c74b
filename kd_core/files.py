"""The one way this project writes a file that others may be reading: a temporary file beside
it, synced, then renamed over it, so a reader sees the old file or the new one, never half of one,
and a crash or a full disk leaves the old file in place."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to; on a clean exit it is synced to disk
    and renamed to ``path``, on an error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")  # one per writer
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
