"""A Workload API caller is attested once, when its connection is accepted, and every request
on that connection is checked to come from that same process, still running the same program.

Selectors read from /proc/PID at request time name whatever runs under that pid *then*; a
caller can connect, fork a child that keeps the socket, and exec a registered binary, and the
child would be served that binary's SVIDs. So the result of attestation is bound to the
connection (`CallerBinder.bind`, at accept), and before each request `BoundCaller.selectors`
refuses (PERMISSION_DENIED, `CallerChangedError`) when:

- the process that connected has exited (its pidfd says so, or its start time changed);
- it has exec'd since it was attested (/proc/PID/exe is another file: device and inode);
- the client socket is held by any other process as well (sock_diag UNIX_DIAG_PEER gives the
  client socket's inode; every /proc/*/fd linking to it is a holder, as ``ss -xp`` shows).
  This scan, the costly part (it reads the descriptor tables of root's and the caller's
  processes), runs at the connection's first request; see `CallerBinder.check` for why a
  later holder needs no new scan.

One more case cannot be told apart afterwards: a process that connects and execs at once,
before the agent has read /proc/PID/exe, is attested as the new program. Only a descriptor
without close-on-exec survives exec, and every SPIFFE client library opens its socket with
close-on-exec; so a caller whose descriptor lacks it (or whose socket the kernel cannot
show: no unix_diag) keeps its uid and gid selectors but gets no ``unix:path`` or
``unix:sha256``. Path and hash selectors name a binary, not who launched it with which
environment: combine them with ``unix:uid`` (README: Workload API).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from trustmesh.agent.localpeer import LocalPeerError, PeerResolver, UnixSocket, socket_descriptors
from trustmesh.agent.workload_attestor import (
    PeerCredentials,
    WorkloadAttestationError,
    WorkloadAttestor,
    _peer_pidfd,  # the one reading of SO_PEERPIDFD, shared with attestation
    _start_time,
    peer_credentials,
)
from trustmesh.errors import TrustmeshError

BINARY_SELECTORS = ("unix:path:", "unix:sha256:")
_O_CLOEXEC_FLAG = 0o2000000  # as /proc/PID/fdinfo/N prints `flags:` (octal)


class CallerChangedError(TrustmeshError):
    """The connection is no longer only the attested process's (Workload API: PERMISSION_DENIED)."""


@dataclass(frozen=True)
class _Exe:
    dev: int
    ino: int
    path: str


def _exe(proc: str, pid: int) -> _Exe | None:
    """The file the process runs; None when it cannot be read (gone, a kernel thread, no
    permission), which compares equal only to another None."""
    link = f"{proc}/{pid}/exe"
    try:
        st = os.stat(link)
        return _Exe(st.st_dev, st.st_ino, os.readlink(link))
    except OSError:
        return None


def survives_exec(proc: str, pid: int, inode: int) -> bool:
    """Whether `pid` holds socket `inode` on a descriptor without close-on-exec."""
    names = socket_descriptors(proc, pid, inode)
    if names is None:
        return True  # cannot tell: assume the worse
    for name in names:
        try:
            with open(f"{proc}/{pid}/fdinfo/{name}", "rb") as handle:
                for line in handle:
                    if line.startswith(b"flags:") and not int(line.split()[1], 8) & _O_CLOEXEC_FLAG:
                        return True
        except (OSError, ValueError, IndexError):
            return True
    return False


class BoundCaller:
    """What one connection was attested as, held for the connection's life."""

    def __init__(self, creds: PeerCredentials, selectors: list[str], exe: _Exe | None, start: str,
                 pidfd: int | None) -> None:
        self.creds = creds
        self._selectors = selectors
        self._exe = exe
        self._start = start
        self._pidfd = pidfd
        self.checked: list[str] | None = None  # the selectors once the holders were checked

    @property
    def attested(self) -> list[str]:
        return list(self._selectors)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def check_same_process(self, proc: str) -> None:
        pid = self.creds.pid
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
            except ProcessLookupError:
                raise CallerChangedError(f"process {pid}, which opened this connection, has exited; "
                                         f"connect again from the process that asks") from None
        try:
            start = _start_time(proc, pid)
        except WorkloadAttestationError:
            start = ""
        if start != self._start:
            raise CallerChangedError(f"process {pid}, which opened this connection, has exited; "
                                     f"connect again from the process that asks")
        now = _exe(proc, pid)
        if now != self._exe:
            program = now.path if now is not None else "an unreadable program"
            raise CallerChangedError(f"process {pid} has run another program ({program}) since it opened "
                                     f"this connection; connect again")


class CallerBinder:
    """Attests connections at accept (`bind`) and checks each request against that (`check`).
    `proc` is where /proc is read (tests point it elsewhere)."""

    def __init__(self, attestor: WorkloadAttestor | None = None, resolver: PeerResolver | None = None,
                 proc: str = "/proc") -> None:
        self._attestor = attestor or WorkloadAttestor(proc)
        # The agent passes a resolver that skips its own descriptor table (it never holds a
        # caller's end); the default reads every table, so in-process callers (tests) work.
        self._resolver = resolver or PeerResolver(proc)
        self._proc = proc

    async def bind(self, sock: UnixSocket) -> BoundCaller:
        """Attest the process that connected, once: WorkloadAttestationError when it cannot be
        (clients retry), CallerChangedError when it exec'd or exited meanwhile."""
        creds = peer_credentials(sock)
        pidfd = _peer_pidfd(sock)
        try:
            exe = _exe(self._proc, creds.pid)
            start = _start_time(self._proc, creds.pid)
            selectors = await self._attestor.selectors_for(creds)
            bound = BoundCaller(creds, selectors, exe, start, pidfd)
            # Read twice around the selectors: an exec or an exit in between would have
            # mixed two programs into one answer.
            bound.check_same_process(self._proc)
        except BaseException:
            _close(pidfd)
            raise
        return bound

    async def check(self, bound: BoundCaller, sock: UnixSocket) -> list[str]:
        """The bound caller's selectors, after checking it alone holds the connection and runs
        what it ran when attested; CallerChangedError otherwise."""
        bound.check_same_process(self._proc)
        if bound.checked is not None:
            # Holders are scanned once per connection: after a scan that found the attested
            # process alone, another holder can only come from that process itself (a fork
            # runs its program; passing the descriptor on is its own choice), and an exec
            # since is caught above. So the scan, the costly part, is not repeated.
            return list(bound.checked)
        pid = bound.creds.pid
        try:
            peer, _ = await self._resolver.unix(sock)
        except LocalPeerError as err:
            raise CallerChangedError(f"cannot tell which processes hold this connection: {err}") from err
        others = sorted({h.pid for h in peer.holders} - {pid})
        if others:
            shown = ", ".join(str(p) for p in others[:5]) + (" ..." if len(others) > 5 else "")
            raise CallerChangedError(f"this connection is also held by process {shown}, not only by process "
                                     f"{pid} that opened it; each process must open its own connection")
        selectors = bound.attested
        if not peer.inode or survives_exec(self._proc, pid, peer.inode):
            # See the module docstring: a program exec'd before attestation read /proc.
            selectors = [s for s in selectors if not s.startswith(BINARY_SELECTORS)]
        bound.check_same_process(self._proc)  # nothing changed while the holders were read
        bound.checked = selectors
        return list(selectors)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
