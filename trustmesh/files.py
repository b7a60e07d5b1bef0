"""Writing a file whole or not at all, private from its first byte.

Keys, identities and bundles are read by other processes (and by us after a crash): a
reader must see the old file or the new one, never half of one, and a private key must
never exist on disk, even for an instant, with a mode that lets another user read it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o600, *, overwrite: bool = True) -> None:
    """Write `data` to `path` with `mode`, atomically: a temp file in the same directory
    (created 0600 by mkstemp, then given `mode`), fsynced, then renamed over `path`.

    With `overwrite=False` an existing `path` is left alone and FileExistsError raised;
    the new file still appears whole (hard link, not an exclusive open that a crash could
    leave half-written). On any failure the temp file is removed and `path` is unchanged.
    The directory must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # some filesystems cannot open a directory; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # likewise: the data is written; only its durability across a crash is weaker
    finally:
        os.close(fd)
