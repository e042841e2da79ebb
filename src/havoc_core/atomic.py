"""Writing a whole directory atomically: it appears complete under its name, or not at all."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


@contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `dst` to fill; on success rename it to `dst`, on error remove it.

    `dst` must not exist or be empty, so nothing a user already has is ever replaced. The sibling's
    name records its host and process; one left by a killed process of this host is removed on the
    next call for the same `dst`, and one from another host is reported.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{_host()}-{os.getpid()}.", suffix=".partial", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_stale(dst: Path) -> None:
    owner = re.compile(rf"^\.{re.escape(dst.name)}\.([0-9a-f]{{8}})-(\d+)\..*\.partial$")
    for partial in dst.parent.glob(f".{dst.name}.*.partial"):
        found = owner.match(partial.name)
        if found and found.group(1) == _host() and not _alive(int(found.group(2))):
            shutil.rmtree(partial, ignore_errors=True)
            print(f"removed {partial}: left by an interrupted run (process {found.group(2)} is gone)", file=sys.stderr)
        elif not found or found.group(1) != _host():
            print(f"note: {partial} looks left by an interrupted run on another machine; delete it if none is "
                  "still writing", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
