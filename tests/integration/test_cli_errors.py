"""Every error a person can cause is one line on stderr and an exit status, never a traceback
(issue 14, hole 9): bad addresses, ports in use, unusable directories, a user who cannot reach
the server's files, broken YAML, usage errors, and output into a pipe its reader closed.

The table runs as real `trustmesh` processes, all at once (most fail before anything starts);
the cases that need a running server share one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import trustmesh
from tests.integration.harness import ServerProcess, trustmesh_cmd
from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
SOURCE_ROOT = str(Path(trustmesh.__file__).resolve().parents[1])  # this checkout, for any uid and cwd
PROCESS_TIMEOUT = 20.0
QUIET_PIPE = (0, 141)  # a closed stdout ends the command as `cat` ends under `| head`: 141, or 0


@dataclass(frozen=True)
class Case:
    """One bad invocation: `args` with {placeholders} filled from the context, the exit status,
    and words the one line on stderr must contain (none: stderr must be empty)."""

    name: str
    args: tuple[str, ...]
    words: tuple[str, ...]
    code: int | tuple[int, ...] = 1
    nobody: bool = False  # run as uid 65534
    closed_stdout: bool = False  # stdout is a pipe whose reader is gone before the command writes


SERVER = ("server", "run", "--trust-domain", "example.org", "--data-dir", "{scratch}/{name}")
LISTEN = ("--bind", "127.0.0.1:0", "--attest-bind", "127.0.0.1:0")
QUIET_SERVER = ("--log-level", "warning", *SERVER, *LISTEN)  # info events would be lines on stderr too
AGENT = ("agent", "run", "--server", "127.0.0.1:1", "--trust-bundle", "{file}", "--join-token-file", "{file}",
         "--data-dir", "{scratch}/{name}")
ADMIN = ("--admin-cert", "{file}", "--admin-key", "{file}", "--trust-bundle", "{file}")

CASES = [
    # Addresses: one parser (trustmesh.hostport) for every address flag, each message naming its flag.
    Case("bind-without-port", (*SERVER, "--bind", "127.0.0.1"), ("--bind", "127.0.0.1", "no port")),
    Case("bind-port-out-of-range", (*SERVER, "--bind", "127.0.0.1:99999"), ("--bind", "99999", "out of range")),
    Case("bind-port-not-a-number", (*SERVER, "--bind", "127.0.0.1:http"), ("--bind", "'http'", "not a number")),
    Case("attest-bind-without-port", (*SERVER, "--attest-bind", "localhost"), ("--attest-bind", "no port")),
    Case("admin-bind-out-of-range", (*SERVER, *LISTEN, "--admin-bind", ":70000"), ("--admin-bind", "out of range")),
    Case("metrics-without-port", (*SERVER, *LISTEN, "--metrics", "127.0.0.1:"), ("--metrics", "no port")),
    Case("server-port-zero", (*AGENT[:2], *AGENT[4:], "--server", "127.0.0.1:0"), ("--server", "port 0")),
    Case("attest-server-without-port", (*AGENT, "--attest-server", "127.0.0.1"), ("--attest-server", "no port")),
    Case("admin-server-without-port", ("agent", "list", "--admin-server", "127.0.0.1", *ADMIN),
         ("--admin-server", "no port")),
    # Ports in use.
    Case("metrics-in-use", (*QUIET_SERVER, "--metrics", "127.0.0.1:{busy}"),
         ("cannot listen on 127.0.0.1:{busy}", "(--metrics)", "already in use")),
    Case("agent-metrics-in-use", (*AGENT, "--metrics", "127.0.0.1:{busy}"),
         ("cannot listen on 127.0.0.1:{busy}", "(--metrics)", "already in use")),
    Case("bundle-endpoint-in-use", (*QUIET_SERVER, "--bundle-endpoint", "127.0.0.1:{busy}"),
         ("127.0.0.1:{busy}", "--bundle-endpoint", "already in use")),
    # Directories that cannot be created or used.
    Case("data-dir-under-a-file", (*SERVER[:-1], "{file}/sub", *LISTEN), ("--data-dir", "{file}/sub", "is a file")),
    Case("data-dir-is-a-file", (*SERVER[:-1], "{file}", *LISTEN), ("--data-dir", "not a directory")),
    Case("agent-data-dir-under-a-file", (*AGENT[:-1], "{file}/sub"), ("--data-dir", "is a file")),
    Case("data-dir-out-of-reach", (*SERVER[:-1], "{private}/server", *LISTEN),
         ("--data-dir", "permission denied", "uid 65534"), nobody=True),
    Case("data-dir-not-writable", (*SERVER[:-1], "{public}", *LISTEN),
         ("--data-dir", "permission denied", "uid 65534"), nobody=True),
    # A CLI user who cannot reach the server's admin socket.
    Case("admin-socket-dir-out-of-reach", ("agent", "list", "--admin-socket", "{private}/admin.sock"),
         ("admin socket", "permission denied", "uid 65534"), nobody=True),
    Case("admin-socket-not-ours", ("audit", "show", "--admin-socket", "{socket}"),
         ("admin socket", "permission denied", "uid 65534"), nobody=True),
    Case("no-server", ("agent", "list", "--admin-socket", "{public}/none.sock"), ("trustmesh server run", "running")),
    # Files and values.
    Case("config-not-yaml", ("server", "run", "--config", "{bad_yaml}"), ("not valid YAML", "line 2")),
    Case("config-not-text", ("server", "run", "--config", "{binary}"), ("config file", "not UTF-8")),
    Case("config-missing", ("server", "run", "--config", "{scratch}/none.yaml"), ("cannot read config file",)),
    Case("bad-duration", (*SERVER, "--ca-ttl", "5 weeks"), ("--ca-ttl", "invalid duration")),
    Case("bad-trust-domain", ("server", "run", "--trust-domain", "Example.org"), ("--trust-domain", "lower case")),
    Case("kek-file-missing", (*SERVER, *LISTEN, "--kek-file", "{scratch}/none.bin"), ("key-encryption key",)),
    # Usage errors: argparse's status 2, on one line.
    Case("unknown-flag", (*SERVER, "--bogus"), ("unrecognized arguments: --bogus", "--help"), code=2),
    Case("missing-required-flag", ("token", "create"), ("--node", "required"), code=2),
    # Output into a pipe nobody reads any more: quiet, whether it is written at exit or by argparse.
    Case("closed-stdout", ("version",), (), code=QUIET_PIPE, closed_stdout=True),
    Case("closed-stdout-help", ("--help",), (), code=QUIET_PIPE, closed_stdout=True),
]


@dataclass
class Context:
    """What the cases refer to: scratch space, files and a port in use."""

    values: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str, case: Case) -> str:
        return text.format(name=case.name, **self.values)


def _run(case: Case, ctx: Context) -> tuple[int, str, str]:
    argv = [ctx.fill(arg, case) for arg in case.args]
    cmd = [*(NOBODY if case.nobody else []), *trustmesh_cmd(*argv)]
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOT}
    env.pop("TRUSTMESH_ADMIN_SOCKET", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ctx.values["public"])
    assert proc.stdout is not None
    if case.closed_stdout:
        proc.stdout.close()  # the child has started (Popen returns after exec): it can only meet a closed pipe
        proc.stdout = None  # communicate() reads stderr alone
    try:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    stdout, stderr = (out or b"").decode(errors="replace"), err.decode(errors="replace")
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def context() -> Iterator[Context]:
    # Under a directory every uid can enter (pytest's tmp_path is private to root), so that
    # uid 65534 meets exactly the permissions each case sets up.
    public = Path(tempfile.mkdtemp(prefix="trustmesh-errors-"))
    public.chmod(0o755)
    scratch = public / "scratch"
    scratch.mkdir()
    private = public / "private"
    private.mkdir(mode=0o700)
    a_file = public / "a-file"
    a_file.write_text("not a directory\n")
    bad_yaml = public / "bad.yaml"
    bad_yaml.write_text("bind: [127.0.0.1:8081\n")
    binary = public / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bind")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    admin = socket.socket(socket.AF_UNIX)  # a root-owned 0600 socket, as the server's admin socket
    admin_path = public / "admin.sock"
    admin.bind(str(admin_path))
    admin_path.chmod(0o600)
    admin.listen()
    try:
        yield Context({"public": str(public), "scratch": str(scratch), "private": str(private), "file": str(a_file),
                       "bad_yaml": str(bad_yaml), "binary": str(binary), "busy": str(busy.getsockname()[1]),
                       "socket": str(admin_path)})
    finally:
        busy.close()
        admin.close()
        shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(scope="module")
def results(context: Context) -> dict[str, tuple[int, str, str]]:
    """Every case's (status, stdout, stderr), run in parallel: each is a short-lived process."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {case.name: pool.submit(_run, case, context) for case in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_one_line_and_no_traceback(case: Case, context: Context, results: dict[str, tuple[int, str, str]]) -> None:
    code, stdout, stderr = results[case.name]
    shown = f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr and "Exception ignored" not in stderr, shown
    lines = stderr.splitlines()
    if not case.words:
        assert lines == [], shown
    else:
        assert len(lines) == 1, shown
        for word in case.words:
            assert context.fill(word, case) in lines[0], shown
    assert code in (case.code if isinstance(case.code, tuple) else (case.code,)), shown


def _with_small_pipe(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`cmd` writing into a one-page pipe: more than a page of output cannot all be buffered
    by the kernel, so the reader closing early is met by the writer for sure."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    try:
        proc = subprocess.Popen(cmd, stdout=write_fd, stderr=subprocess.PIPE, env=env)
    finally:
        os.close(write_fd)
    proc.stdout = os.fdopen(read_fd, "rb", buffering=0)
    return proc


def test_output_piped_into_head_ends_quietly(make_server: Callable[..., ServerProcess]) -> None:
    """`trustmesh audit show | head -1` against a real server: the reader closes after one
    line while the command still has output; it ends quietly, not in a BrokenPipeError."""
    server = make_server()
    with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for i in range(60):  # about 9 KiB of `audit show` output: more than a page pipe and a line
            stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=f"node-{i}"), timeout=30)
    env = {**os.environ, "TRUSTMESH_ADMIN_SOCKET": str(server.admin_socket)}
    assert len(server.cli("audit", "show", check=True).stdout) > 2 * 4096
    proc = _with_small_pipe(trustmesh_cmd("audit", "show"), env)
    assert proc.stdout is not None and proc.stderr is not None
    first = b""
    while not first.endswith(b"\n"):  # `head -1`: one line, read byte by byte so that no more is taken
        chunk = proc.stdout.read(1)
        assert chunk, "no output at all"
        first += chunk
    proc.stdout.close()
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = proc.wait(timeout=PROCESS_TIMEOUT)
    assert first.split()[0] == b"1", first  # the first audit row, and nothing else was read
    assert stderr == "" and code in QUIET_PIPE, (code, stderr)


def test_a_second_server_on_the_same_data_directory_leaves_the_first_one_its_socket(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A second `server run` on a running server's data directory is refused in one line;
    the first server keeps its admin socket (it used to be taken over, then removed)."""
    first = make_server()
    second = subprocess.run(
        trustmesh_cmd("--log-level", "warning", "server", "run", "--trust-domain", "example.org",
                      "--data-dir", str(first.data_dir), "--bind", "127.0.0.1:0", "--attest-bind", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, env={**os.environ, "PYTHONPATH": SOURCE_ROOT})
    assert second.returncode == 1, second
    assert second.stderr.splitlines() == [second.stderr.strip()] and "Traceback" not in second.stderr
    assert "another process is serving on" in second.stderr and "--admin-socket" in second.stderr
    assert first.cli("agent", "list").returncode == 0


def test_an_unexpected_error_is_one_line_naming_the_debug_switch(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The last resort, for bugs only: one line and status 70, or the traceback on request."""
    from trustmesh.cli import main as cli

    def broken(_level: str) -> None:
        raise KeyError("no-such-key")

    monkeypatch.setattr(cli, "setup_logging", broken)  # a bug anywhere under main() would do
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["version"]) == 70
    err = capsys.readouterr().err
    assert err == "trustmesh: internal error: KeyError: 'no-such-key' (run with TRUSTMESH_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        cli.main(["version"])

