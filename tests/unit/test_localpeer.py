"""Who holds the client end of a local connection: the kernel tables read right (both byte
orders of the address text, IPv4 inside IPv6), every holder found, one scan shared by many
lookups, and every way pinning a holder must refuse (pid reused, gone, set-id, another uid)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.agent.localpeer import (
    Holder,
    LocalPeer,
    LocalPeerError,
    PeerResolver,
    PinnedHolder,
    TcpQuery,
    endpoint,
    find_holders,
    find_tcp_sockets,
    inet_diag_works,
    parse_tcp_table,
)

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _hex4(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp prints it: the 32-bit word in host byte order."""
    word = struct.unpack("=I", socket.inet_aton(host))[0]
    return f"{word:08X}:{port:04X}"


def _hex6(host: str, port: int) -> str:
    raw = socket.inet_pton(socket.AF_INET6, host)
    return "".join(f"{struct.unpack('=I', raw[i:i + 4])[0]:08X}" for i in range(0, 16, 4)) + f":{port:04X}"


def _row(local: str, remote: str, uid: int, inode: int) -> str:
    return f"   0: {local} {remote} 01 00000000:00000000 00:00000000 00000000 {uid:5d}        0 {inode} 1 0 20 4 30\n"


def _stat(pid: int, start: int) -> str:
    return f"{pid} (proc) S " + " ".join(["0"] * 18 + [str(start)] + ["0"] * 10)


def _process(proc: Path, pid: int, start: int, sockets: list[int], uid: tuple[int, int] = (0, 0),
             gid: tuple[int, int] = (0, 0)) -> None:
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(_stat(pid, start))
    (proc / str(pid) / "status").write_text(f"Name:\tproc\nUid:\t{uid[0]}\t{uid[1]}\t{uid[1]}\t{uid[1]}\n"
                                            f"Gid:\t{gid[0]}\t{gid[1]}\t{gid[1]}\t{gid[1]}\n")
    for fd, inode in enumerate(sockets, start=3):
        (proc / str(pid) / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")
    (proc / str(pid) / "fd" / "0").symlink_to("/dev/null")


def test_the_socket_tables_are_read_in_the_hosts_byte_order_and_ipv4_equals_mapped_ipv6() -> None:
    rows = list(parse_tcp_table(HEADER + _row(_hex4("127.0.0.1", 40000), _hex4("127.0.0.2", 15001), 65534, 77)
                                + _row(_hex6("::1", 40001), _hex6("::1", 15001), 0, 78)
                                + _row(_hex6("::ffff:127.0.0.1", 40002), _hex6("::ffff:127.0.0.1", 15001), 5, 79)
                                + "   garbage line\n"))
    assert [(r.local, r.remote, r.uid, r.inode) for r in rows] == [
        (endpoint("127.0.0.1", 40000), endpoint("127.0.0.2", 15001), 65534, 77),
        (endpoint("::1", 40001), endpoint("::1", 15001), 0, 78),
        (endpoint("127.0.0.1", 40002), endpoint("127.0.0.1", 15001), 5, 79),
    ]
    assert endpoint("::ffff:127.0.0.1", 1) == endpoint("127.0.0.1", 1) != endpoint("::1", 1)


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "tcp").write_text(
        HEADER + _row(_hex4("127.0.0.1", 40000), _hex4("127.0.0.1", 15001), 65534, 500)  # the caller's socket
        + _row(_hex4("127.0.0.1", 15001), _hex4("127.0.0.1", 40000), 0, 501)  # our accepted end
        + _row(_hex4("127.0.0.1", 40001), _hex4("127.0.0.1", 15001), 0, 0)  # TIME_WAIT: no inode
        + _row(_hex4("127.0.0.1", 40002), _hex4("127.0.0.1", 15001), 0, 502))  # nobody holds it
    (proc / "net" / "tcp6").write_text(HEADER + _row(_hex6("::1", 40003), _hex6("::1", 15001), 1000, 503))
    _process(proc, 10, 111, [500])
    _process(proc, 11, 222, [500, 503])  # a forked child keeps the caller's socket
    _process(proc, 12, 333, [501])
    return proc


def test_the_tables_and_a_scan_find_every_holder_and_nothing_else(fake_proc: Path) -> None:
    ours = endpoint("127.0.0.1", 15001)
    caller = TcpQuery(endpoint("127.0.0.1", 40000), ours)
    v6 = TcpQuery(endpoint("::1", 40003), endpoint("::1", 15001))
    time_wait = TcpQuery(endpoint("127.0.0.1", 40001), ours)
    orphan = TcpQuery(endpoint("127.0.0.1", 40002), ours)
    missing = TcpQuery(endpoint("127.0.0.1", 40009), ours)
    rows = find_tcp_sockets([caller, v6, time_wait, orphan, missing], str(fake_proc), netlink=False)
    assert {q: (r.inode, r.uid) for q, r in rows.items()} == {caller: (500, 65534), v6: (503, 1000),
                                                             orphan: (502, 0)}
    holders = find_holders({500: 65534, 503: 1000, 502: 0, 501: 0}, str(fake_proc))
    assert holders == {500: [Holder(10, "111"), Holder(11, "222")], 503: [Holder(11, "222")], 502: [],
                       501: [Holder(12, "333")]}


def test_a_holder_is_pinned_and_refused_when_replaced_set_id_or_of_another_uid(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _process(proc, 20, 100, [900], uid=(0, 0))
    _process(proc, 21, 100, [900], uid=(1000, 0))  # a set-user-ID program
    _process(proc, 22, 100, [900], uid=(0, 0), gid=(1000, 50))  # a set-group-ID program
    _process(proc, 23, 100, [900], uid=(1000, 1000))  # dropped to another uid after connecting
    _process(proc, 24, 100, [901])  # no longer holds this socket
    peer = LocalPeer(900, 0, ())

    def no_pidfd(pid: int, flags: int = 0, /) -> int:
        raise OSError(38, "no pidfd here")  # ENOSYS: start times alone

    with PinnedHolder(peer, Holder(20, "100"), str(proc), no_pidfd) as pinned:
        assert (pinned.credentials.pid, pinned.credentials.uid, pinned.credentials.gid) == (20, 0, 0)
        pinned.confirm()
        (proc / "20" / "stat").write_text(_stat(20, 999))  # the pid was taken by another process
        with pytest.raises(LocalPeerError) as replaced:
            pinned.confirm()
        assert replaced.value.reason == "pid_reused"
    cases = [(Holder(20, "555"), "pid_reused"), (Holder(20, ""), "pid_reused"), (Holder(21, "100"), "setid"),
             (Holder(22, "100"), "setid"), (Holder(23, "100"), "uid_changed"), (Holder(24, "100"), "gone"),
             (Holder(25, "100"), "gone")]
    for holder, reason in cases:
        with pytest.raises(LocalPeerError) as refused:
            PinnedHolder(peer, holder, str(proc), no_pidfd)
        assert refused.value.reason == reason, holder


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket, tuple[str, int]]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    client = socket.create_connection(server.getsockname())
    accepted, peer = server.accept()
    yield client, accepted, peer
    for s in (client, accepted, server):
        s.close()


@pytest.mark.parametrize("netlink", [True, False], ids=["sock_diag", "proc_net_tcp"])
async def test_a_real_connection_resolves_to_this_process_and_a_child_holding_it(
        connection: tuple[socket.socket, socket.socket, tuple[str, int]], netlink: bool) -> None:
    if netlink and not inet_diag_works():
        pytest.skip("this kernel has no tcp_diag")
    client, accepted, peer = connection
    resolver = PeerResolver(netlink=netlink)
    found = await resolver.tcp(peer, accepted.getsockname())
    assert found.inode == os.fstat(client.fileno()).st_ino and found.uid == os.getuid()
    assert [h.pid for h in found.holders] == [os.getpid()]
    with PinnedHolder(found, found.holders[0]) as pinned:
        assert pinned.credentials.uid == os.geteuid()
        pinned.confirm()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=[client.fileno()])
    try:
        shared = await resolver.tcp(peer, accepted.getsockname())
        assert sorted(h.pid for h in shared.holders) == sorted([os.getpid(), child.pid])
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    with pytest.raises(LocalPeerError) as gone:  # the child exited: pinning it fails
        PinnedHolder(shared, next(h for h in shared.holders if h.pid == child.pid))
    assert gone.value.reason == "gone"
    # Not a connection of this node (or closed since): refused, never guessed.
    with pytest.raises(LocalPeerError) as unknown:
        await resolver.tcp(("127.0.0.1", 1), accepted.getsockname())
    assert unknown.value.reason == "no_socket"
    # Nobody holds it any more (the caller exited after connecting): refused.
    inode = found.inode
    client.close()
    with pytest.raises(LocalPeerError) as orphaned:
        await resolver.tcp(peer, accepted.getsockname())
    assert orphaned.value.reason in ("no_process", "no_socket"), inode


async def test_lookups_made_together_share_one_scan_per_socket_owner() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    pairs = []
    try:
        for _ in range(30):
            client = socket.create_connection(server.getsockname())
            accepted, peer = server.accept()
            pairs.append((client, accepted, peer))
        resolver = PeerResolver()
        found = await asyncio.gather(*(resolver.tcp(peer, accepted.getsockname()) for _, accepted, peer in pairs))
        assert [f.inode for f in found] == [os.fstat(c.fileno()).st_ino for c, _, _ in pairs]
        assert resolver.scans == 1
    finally:
        for client, accepted, _ in pairs:
            client.close()
            accepted.close()
        server.close()


async def test_a_unix_caller_resolves_through_its_peer_socket() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        found, creds = await PeerResolver().unix(ours)
        assert (creds.pid, creds.uid) == (os.getpid(), os.getuid())
        assert found.uid == os.getuid() and [h.pid for h in found.holders] == [os.getpid()]
        assert found.inode in (0, os.fstat(theirs.fileno()).st_ino)  # 0 only without unix_diag
    finally:
        ours.close()
        theirs.close()


def test_holders_are_found_across_the_whole_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)  # not a pid: skipped
    for pid in range(100, 140):
        _process(proc, pid, pid, [7000 + pid % 3])
    found = find_holders({7000: 0, 7001: 0, 7003: 0}, str(proc))
    assert [h.pid for h in found[7000]] == list(range(102, 140, 3))
    assert [h.pid for h in found[7001]] == list(range(100, 140, 3)) and found[7003] == []
    # Only the sockets' owners' and root's processes are read: uid 2000's (104) for its socket,
    # not uid 1000's (101); nor the process asked to be skipped (the agent itself, 107).
    os.chown(proc / "101", 1000, 1000)
    os.chown(proc / "104", 2000, 2000)
    found = find_holders({7001: 0, 7002: 2000}, str(proc), skip=107)
    assert [h.pid for h in found[7001]] == list(range(100, 140, 3))
    assert [h.pid for h in found[7002]] == [104, *range(110, 140, 3)]


async def test_each_socket_owner_has_its_own_scan() -> None:
    """A connection of uid 65534 is scanned apart from root's: one user's flood cannot hold
    another's checks back (its holders are found in their own pass)."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as uid 65534")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    code = ("import socket, sys; c = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
            "print('connected', flush=True); sys.stdin.read()")
    other = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                              "-I", "-c", code, str(server.getsockname()[1])], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd="/")
    try:
        assert other.stdout is not None and other.stdout.readline() == b"connected\n"
        theirs, their_peer = server.accept()
        mine = socket.create_connection(server.getsockname())
        ours, our_peer = server.accept()
        resolver = PeerResolver()
        found = await asyncio.gather(resolver.tcp(their_peer, theirs.getsockname()),
                                     resolver.tcp(our_peer, ours.getsockname()))
        assert [(f.uid, [h.pid for h in f.holders]) for f in found] == [(65534, [other.pid]), (0, [os.getpid()])]
        assert resolver.scans == 2
        with pytest.raises(LocalPeerError) as refused:  # held by uid 65534, which is not the caller's uid 0
            PinnedHolder(LocalPeer(found[0].inode, 0, found[0].holders), found[0].holders[0])
        assert refused.value.reason == "uid_changed"
        for s in (theirs, mine, ours):
            s.close()
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait()
        server.close()
