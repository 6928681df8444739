"""Atomic file writes shared by the command line and the demo (no import between the two)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Container, Iterator
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_temporaries"]

_TMP_RE = re.compile(r"^\.(.+)\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``path``; on success rename it to ``path`` (atomically).

    The temporary name is ``.<stem>.tmp<pid><suffix>`` (same folder, so ``os.replace`` is atomic and the
    suffix still tells writers the format). On an exception the temporary file is removed and ``path`` is
    left as it was, so no reader ever sees a half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(*folders: Path, only: Container[str] | None = None) -> None:
    """Delete temporaries a killed run left behind (names made by :func:`atomic_path`, of dead processes).

    ``only``: the names of the files whose temporaries may go (one of several processes writing into the
    same folder, maybe on other hosts where process ids mean nothing, removes only its own).
    """
    for folder in folders:
        if folder.is_dir():
            for entry in folder.iterdir():
                match = _TMP_RE.match(entry.name)
                if not match or not entry.is_file() or _alive(int(match.group(2))):
                    continue
                if only is None or match.group(1) + (match.group(3) or "") in only:
                    entry.unlink()


def _alive(pid: int) -> bool:
    """Whether another process with this id is running (its temporaries are still being written)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
