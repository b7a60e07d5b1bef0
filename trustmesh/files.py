"""Writing a file whole or not at all, private from its first byte; claiming the path of a
unix socket we are about to listen on.

Keys, identities and bundles are read by other processes (and by us after a crash): a
reader must see the old file or the new one, never half of one, and a private key must
never exist on disk, even for an instant, with a mode that lets another user read it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import tempfile
from pathlib import Path

from trustmesh.errors import LocalPathError, TrustmeshError


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


def ensure_directory(path: Path, flag: str, mode: int = 0o700) -> None:
    """Create `path` (and missing parents; the last one with `mode`) unless it exists, and check
    that this process may create files in it; else one line naming `flag` and what to do."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError as err:
        raise LocalPathError(f"{flag} {path} exists and is not a directory; remove it or pick another {flag}") from err
    except NotADirectoryError as err:
        raise LocalPathError(f"cannot create {flag} {path}: a part of the path is a file, not a directory; "
                             f"pick another {flag}") from err
    except PermissionError as err:
        raise LocalPathError(f"cannot create or enter {flag} {path}: permission denied for uid {os.getuid()}; "
                             f"run as the directory's owner or pick another {flag}") from err
    except OSError as err:
        raise LocalPathError(f"cannot create {flag} {path}: {(err.strerror or str(err)).lower()}; "
                             f"pick another {flag}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise LocalPathError(f"cannot write in {flag} {path}: permission denied for uid {os.getuid()}; "
                             f"run as the directory's owner or pick another {flag}")


class SocketPathError(TrustmeshError):
    """A unix socket path we were to listen on is taken or unusable."""


async def claim_socket_path(path: Path, choose: str) -> None:
    """Remove a socket file left by a previous run, but never steal a live server's socket
    nor remove anything that is not a socket (a symlink included). `choose` names what the
    user can change instead, e.g. "another --socket"."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; remove it or choose {choose}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(probe, str(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketPathError(f"cannot check whether {path} is in use: {err.strerror}") from err
    else:
        raise SocketPathError(f"another process is serving on {path}; stop it or choose {choose}")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


class PrivateFileError(TrustmeshError):
    """A file holding a secret is missing, unreadable, too large or readable by others."""


def read_private_file(path: Path, what: str, *, limit: int = 1 << 20, group_may_read: bool = True) -> bytes:
    """The bytes of a secret (a password, a private key) that other users must not read.

    Refused when others (and, unless `group_may_read`, the group) may read or write it: the
    secret would already be known to every account on the host. Mode and contents come from
    one open file, so a swap between the check and the read cannot slip in another file.
    `what` names the file for messages, e.g. "--etcd-password-file".
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never hang on a FIFO
    except FileNotFoundError as err:
        raise PrivateFileError(f"{what} {path} does not exist") from err
    except OSError as err:
        raise PrivateFileError(f"cannot read {what} {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"cannot read {what} {path}: not a regular file")
        closed = stat.S_IRWXO if group_may_read else stat.S_IRWXG | stat.S_IRWXO
        if st.st_mode & closed:
            who = "other users" if group_may_read else "group or others"
            raise PrivateFileError(f"{what} {path} is open to {who} (mode {oct(st.st_mode & 0o777)}); "
                                   f"run `chmod 600 {path}`")
        data = os.read(fd, limit + 1)  # bounded: a wrong path (a log, a device) is not slurped whole
    except OSError as err:
        raise PrivateFileError(f"cannot read {what} {path}: {err.strerror}") from err
    finally:
        os.close(fd)
    if len(data) > limit:
        raise PrivateFileError(f"{what} {path} is larger than {limit} bytes; is it the right file?")
    return data
