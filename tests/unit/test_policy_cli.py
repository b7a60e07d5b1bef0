"""`trustmesh policy` exit codes a CI pipeline can rely on (issue 14, hole 5): lint 0 clean,
1 problems, 2 unreadable; test 0 allow, 1 deny, 2 invalid input; apply of nothing needs
--allow-empty; `test --at` answers as of that time."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmesh.cli.main import main

DOC = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-access, owner: payments}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/payments
    - from: spiffe://partner.example/settlement
      expires: 2031-01-01T00:00:00Z
"""
PAST = DOC.replace("2031-01-01", "2021-01-01")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRUSTMESH_ADMIN_SOCKET", str(tmp_path / "no-server.sock"))
    (tmp_path / "good.yaml").write_text(DOC)
    (tmp_path / "expired.yaml").write_text(PAST)
    (tmp_path / "dup.yaml").write_text(DOC.replace("spec:\n", "spec:\n  mode: enforce\n  mode: audit\n"))
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_lint_exit_codes(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "lint", str(files / "good.yaml"))[0] == 0
    code, out, _ = run(capsys, "lint", str(files / "dup.yaml"))
    assert code == 1 and "dup.yaml: document 1: line 6: duplicate key 'mode' (first at line 5)" in out
    code, out, _ = run(capsys, "lint", str(files / "missing.yaml"))
    assert code == 2 and "missing.yaml: document 1: (file): cannot read" in out


def test_lint_warns_on_expired_rules_and_strict_refuses_them(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An unchanged repository must not start failing CI the day a rule expires.
    code, out, _ = run(capsys, "lint", str(files / "expired.yaml"))
    assert code == 0
    assert "warning: " in out and "spec.allow[1].expires: expired at 2021-01-01T00:00:00Z" in out
    assert "ok: 1 allowlist(s), 1 warning(s)" in out
    code, out, _ = run(capsys, "lint", "--strict", str(files / "expired.yaml"))
    assert code == 1 and "spec.allow[1].expires: 2021-01-01T00:00:00Z is in the past" in out


def test_test_answers_as_of_at(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ask = ("test", str(files / "good.yaml"), "--from", "spiffe://partner.example/settlement",
           "--to", "spiffe://example.org/ledger")
    assert run(capsys, *ask, "--at", "2030-12-31T23:59:59Z")[0] == 0
    code, out, _ = run(capsys, *ask, "--at", "2031-06-01T00:00:00Z")
    assert code == 1 and out.startswith("DENY  default deny") and "expired at 2031-01-01" in out
    # A rule expired long ago is not a reason to refuse the question.
    assert run(capsys, "test", str(files / "expired.yaml"), *ask[2:])[0] == 1
    assert run(capsys, "test", str(files / "expired.yaml"), *ask[2:], "--at", "2020-06-01T00:00:00Z")[0] == 0


@pytest.mark.parametrize(("args", "message"), [
    (("dup.yaml", "--from", "spiffe://example.org/payments"), "fix the problems above first"),
    (("missing.yaml", "--from", "spiffe://example.org/payments"), "fix the problems above first"),
    (("good.yaml", "--from", "not-an-id"), "not-an-id"),
    (("good.yaml", "--from", "spiffe://example.org/payments", "--at", "tomorrow"), "--at 'tomorrow'"),
    (("--from", "spiffe://example.org/payments",), "cannot reach the trustmesh server"),
    (("good.yaml", "--from", "spiffe://example.org/payments", "--port", "99999"), "--port 99999: a port is 1 to"),
])
def test_test_invalid_input_is_2_not_deny(files: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                          message: str) -> None:
    full = [str(files / a) if a.endswith(".yaml") else a for a in args]
    code, _, err = run(capsys, "test", *full, "--to", "spiffe://example.org/ledger")
    assert code == 2
    assert err.startswith("trustmesh: error: ") and message in err and err.count("\n") == 1


def test_apply_of_nothing_needs_allow_empty(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "apply", str(files / "empty"))
    assert code == 1
    assert err == (f"trustmesh: error: no allowlists in {files / 'empty'}: applying would deny every connection; "
                   "pass --allow-empty to deny everything deliberately\n")
    # With the flag it goes on to the server (here: none).
    code, _, err = run(capsys, "apply", str(files / "empty"), "--allow-empty")
    assert code == 1 and "cannot reach the trustmesh server" in err


ROUTES = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {name: ledger-read, owner: payments}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/fraud-scoring
      methods: [GET, HEAD]
      paths: ["/transactions/*", "/health"]
"""


@pytest.fixture
def routes(files: Path) -> list[str]:
    (files / "routes.yaml").write_text(ROUTES)
    return ["test", str(files / "routes.yaml"), "--from", "spiffe://example.org/fraud-scoring",
            "--to", "spiffe://example.org/ledger"]


@pytest.mark.parametrize(("flags", "code", "start"), [
    (("--method", "GET", "--path", "/transactions/1"), 0, "ALLOW  ledger-read allow[0]: "),
    (("--path", "/transactions/1?page=2"), 0, "ALLOW  ledger-read allow[0]: "),  # GET; the query is ignored
    (("--path", "/a/../transactions//1"), 0, "ALLOW  "),  # normalised as a listener does
    (("--method", "HEAD"), 1, "DENY  default deny: "),  # path /
    (("--method", "POST", "--path", "/transactions/1"), 1, "DENY  default deny: "),
    ((), 1, "DENY  default deny: ledger-read allow[0] allows only HTTP requests"),  # a plain connection
])
def test_test_decides_http_requests(routes: list[str], capsys: pytest.CaptureFixture[str], flags: tuple[str, ...],
                                    code: int, start: str) -> None:
    got, out, _ = run(capsys, *routes, *flags)
    assert got == code and out.startswith(start), out
    if code == 0:
        assert out.rstrip().endswith("(route GET /transactions/*)")


def test_test_prints_the_route_without_the_path(routes: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *routes, "--method", "POST", "--path", "/transactions/4111111111111111")
    assert code == 1 and out.rstrip().endswith("(route POST)") and "4111" not in out


@pytest.mark.parametrize(("flags", "message"), [
    (("--path", "/public;x/../admin"), "--path: an http listener refuses this path (400): a ';' in a path"),
    (("--path", "/a%2Fb"), "--path: an http listener refuses this path (400): an encoded slash"),
    (("--path", "/../etc"), "climbs above the root"),
    (("--path", "transactions"), "must start with '/'"),
    (("--method", "get", "--path", "/health"), "--method: 'get' is not a method: methods are case-sensitive; use GET"),
])
def test_test_refuses_an_ambiguous_request_as_invalid(routes: list[str], capsys: pytest.CaptureFixture[str],
                                                      flags: tuple[str, ...], message: str) -> None:
    code, out, err = run(capsys, *routes, *flags)
    assert code == 2 and out == ""
    assert err.startswith("trustmesh: error: ") and message in err and err.count("\n") == 1


def test_lint_reports_route_problems(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "bad-routes.yaml").write_text(ROUTES.replace("[GET, HEAD]", "[get]"))
    code, out, _ = run(capsys, "lint", str(files / "bad-routes.yaml"))
    assert code == 1 and "document 1: spec.allow[0].methods[0]: 'get' is not a method" in out
