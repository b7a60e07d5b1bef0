"""The web console's security, without a browser: a real server process serving the console,
operators enrolled through the CLI and logging in with TOTP codes computed here, and an HTTPS
client that checks the server's certificate against the trust bundle.

The pages are this test's own minimal files (TRUSTMESH_CONSOLE_STATIC_DIR), so what is tested
is the backend's contract, whatever the real pages look like. One server for the module;
the expiry test starts a second one whose sessions last seconds."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import AgentProcess, ServerProcess, wait_until
from tests.integration.operators_kit import PASSWORD, Operator, add_operator
from trustmesh.clock import parse_utc

pytestmark = pytest.mark.slow

SESSION = "__Host-tm_session"
LOGIN = "__Host-tm_login"
DEBUG, LEDGER = "spiffe://example.org/ns/ops/debug", "spiffe://example.org/ledger"
HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'"),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "strict-transport-security": "max-age=31536000",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [9443]
  allow:
{sources}"""
LOGIN_PAGE = """<!doctype html>
<form id="login-form" method="post" action="/login"><input type="hidden" name="csrf" value="{{csrf}}"></form>
"""


@dataclass
class Console:
    server: ServerProcess
    base: str  # https://localhost:PORT
    setup: tuple[ServerProcess, str, str]  # the server, its admin and login listeners
    home: Path
    ada: Operator  # admin
    vic: Operator  # viewer
    pending: str  # an access request of ada's, pending

    def operator(self, name: str, *roles: str) -> Operator:
        """Another person: each has TOTP codes of their own, so no test waits for the next
        30-second step because an earlier one used the codes of now."""
        return add_operator(self.setup, self.home, name, *roles)

    def client(self) -> httpx.Client:
        """A browser of its own (its own cookies), checking the console's certificate (the
        server's SVID, for localhost) against the trust bundle."""
        ctx = ssl.create_default_context(cafile=str(self.server.bundle_path))
        return httpx.Client(base_url=self.base, verify=ctx, timeout=30, follow_redirects=False)


def _static(tmp: Path) -> Path:
    static = tmp / "static"
    static.mkdir()
    (static / "login.html").write_text(LOGIN_PAGE)
    for page in ("index", "access"):
        (static / f"{page}.html").write_text(f'<!doctype html><main id="{page}"></main>\n')
    (static / "app.css").write_text("body { margin: 0 }\n")
    return static


def _start(tmp: Path, *extra: str) -> tuple[ServerProcess, str, tuple[ServerProcess, str, str]]:
    server = ServerProcess(data_dir=tmp / "server", env={"TRUSTMESH_CONSOLE_STATIC_DIR": str(_static(tmp))},
                           extra=["--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0",
                                  "--console-bind", "127.0.0.1:0", *extra])
    server.start()
    log = server.log()
    found = {name: re.search(rf"\b{name}=(\S+)", log) for name in ("admin_bind", "login_bind", "console_bind")}
    assert all(found.values()), log[-2000:]
    ready = next(line for line in log.splitlines() if "event=ready" in line)
    assert f" console_bind={found['console_bind'].group(1)} " in ready + " "  # type: ignore[union-attr]
    port = found["console_bind"].group(1).rpartition(":")[2]  # type: ignore[union-attr]
    return (server, f"https://localhost:{port}",
            (server, found["admin_bind"].group(1), found["login_bind"].group(1)))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    server, base, setup = _start(tmp)
    try:
        ada = add_operator(setup, tmp, "ada", "admin")
        vic = add_operator(setup, tmp, "vic", "viewer")
        assert ada.login().returncode == 0  # the CLI, to ask for access
        asked = ada.run("access", "request", "--from", DEBUG, "--to", LEDGER, "--port", "5432", "--for", "30m",
                        "--reason", "INC-1: reconcile")
        assert asked.returncode == 0, asked.stderr
        yield Console(server, base, setup, tmp, ada, vic, asked.stdout.strip())
    finally:
        server.stop()


def _csrf_of_login_page(client: httpx.Client) -> str:
    page = client.get("/login")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found and len(found.group(1)) >= 43 and client.cookies.get(LOGIN) == found.group(1)
    return found.group(1)


def _post_login(client: httpx.Client, person: Operator, *, otp: str | None = None,
                password: str = PASSWORD) -> httpx.Response:
    csrf = _csrf_of_login_page(client)
    return client.post("/login", data={"operator": person.name, "password": password, "otp": otp or person.code(),
                                       "csrf": csrf})


def _log_in(client: httpx.Client, person: Operator) -> dict[str, object]:
    answer = _post_login(client, person)
    assert answer.status_code == 303 and answer.headers["location"] == "/", (answer.status_code, answer.text)
    me = client.get("/api/session")
    assert me.status_code == 200, me.text
    session: dict[str, object] = me.json()
    return session


def _until(text: object) -> float:
    return parse_utc(str(text)).timestamp()


def _cookies(cookies: dict[str, str]) -> dict[str, str]:
    """A Cookie header sending exactly `cookies` (not the client's own), as a browser would
    that someone planted them in."""
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items())}


def _set_cookie(response: httpx.Response, name: str) -> str:
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    return header


def _has_security_headers(response: httpx.Response, what: str) -> None:
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, f"{what}: {name} is {response.headers.get(name)!r}"
    expected = "no-cache" if response.request.url.path.startswith("/static/") else "no-store"
    assert response.headers.get("cache-control") == expected, f"{what}: {response.headers.get('cache-control')}"


# --- login ---------------------------------------------------------------------------------------


def test_login_with_a_totp_code_sets_a_host_only_strict_session_cookie(console: Console) -> None:
    amy = console.operator("amy", "admin", "auditor")
    with console.client() as client:
        before = time.time()
        answer = _post_login(client, amy)
        assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
        header = _set_cookie(answer, SESSION)
        cookie = SimpleCookie()
        cookie.load(header)
        morsel = cookie[SESSION]
        assert len(morsel.value) >= 43  # 32 random bytes
        assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert not morsel["domain"]  # __Host-: this host only
        # The login form's token is spent.
        assert any(h.startswith(f"{LOGIN}=") and "Max-Age=0" in h for h in answer.headers.get_list("set-cookie"))

        me = client.get("/api/session").json()
        assert me["operator"] == "amy" and me["roles"] == ["admin", "auditor"]
        assert me["spiffe_id"] == "spiffe://example.org/operator/amy" and len(me["csrf"]) >= 43
        expires = _until(me["expires_at"])
        # Max-Age is what is left of the certificate (the server's 8 h default), never more.
        assert 0 < int(morsel["max-age"]) <= expires - before + 1
        assert expires - before <= 8 * 3600 + 5
        assert client.get("/").status_code == 200

    # The console's own log names the operator and the browser, and nothing of the session.
    lines = [line for line in console.server.log().splitlines() if "event=console_login " in line]
    assert lines and "operator=amy" in lines[-1] and "browser=127.0.0.1" in lines[-1]
    assert morsel.value not in console.server.log() and me["csrf"] not in console.server.log()


def test_a_wrong_code_or_password_is_refused_with_the_same_words(console: Console) -> None:
    with console.client() as client:
        wrong_code = _post_login(client, console.vic, otp="000000")
        wrong_password = _post_login(client, console.vic, otp="000000", password="not the password")
        for answer in (wrong_code, wrong_password):
            assert answer.status_code == 303 and answer.headers["location"] == "/login?error=refused"
            assert not any(h.startswith(f"{SESSION}=") for h in answer.headers.get_list("set-cookie"))
        assert client.get("/api/session").status_code == 401
        # A script asking for JSON reads the same refusal whichever factor was wrong.
        csrf = _csrf_of_login_page(client)
        refused = client.post("/login", headers={"Accept": "application/json"},
                              data={"operator": "nobody", "password": "nope", "otp": "123456", "csrf": csrf})
        assert refused.status_code == 401 and refused.json() == {"error": "refused", "message": "login refused"}
    assert "console_login_refused" in console.server.log()
    assert "not the password" not in console.server.log()


def test_login_needs_the_login_pages_token(console: Console) -> None:
    with console.client() as client:
        _csrf_of_login_page(client)
        fields = {"operator": "ada", "password": PASSWORD, "otp": "123456"}
        for data in (fields, {**fields, "csrf": "x" * 43}):
            answer = client.post("/login", data=data)  # a form: back to a fresh one, saying why
            assert answer.status_code == 303 and answer.headers["location"] == "/login?error=csrf", answer.text
            assert not any(h.startswith(f"{SESSION}=") for h in answer.headers.get_list("set-cookie"))
            scripted = client.post("/login", data=data, headers={"Accept": "application/json"})
            assert scripted.status_code == 403 and scripted.json()["error"] == "csrf", scripted.text
    with console.client() as fresh:  # the token without its cookie
        answer = fresh.post("/login", data={**fields, "csrf": "y" * 43}, headers={"Accept": "application/json"})
        assert answer.status_code == 403 and answer.json()["error"] == "csrf"
        # From another site's page: refused before anything else.
        csrf = _csrf_of_login_page(fresh)
        forged = fresh.post("/login", data={**fields, "csrf": csrf}, headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403 and forged.json()["error"] == "csrf"


# --- CSRF, sessions -----------------------------------------------------------------------------


def test_posts_need_the_sessions_csrf_token_and_the_consoles_origin(console: Console) -> None:
    bob = console.operator("bob", "auditor")
    with console.client() as client:
        me = _log_in(client, bob)
        refused = [client.post("/api/audit/verify"),
                   client.post("/api/audit/verify", headers={"X-CSRF-Token": "z" * 43}),
                   client.post("/api/audit/verify", data={"csrf": "z" * 43}),
                   client.post("/api/audit/verify", headers={"X-CSRF-Token": str(me["csrf"]),
                                                            "Origin": "https://evil.example"}),
                   client.post("/api/audit/verify", headers={"X-CSRF-Token": str(me["csrf"]),
                                                            "Sec-Fetch-Site": "cross-site"}),
                   client.post("/logout")]
        for answer in refused:
            assert answer.status_code == 403 and answer.json()["error"] == "csrf", answer.text
        assert client.get("/api/session").status_code == 200  # the forged logout did nothing
        ok = client.post("/api/audit/verify", headers={"X-CSRF-Token": str(me["csrf"]),
                                                      "Origin": console.base, "Sec-Fetch-Site": "same-origin"})
        assert ok.status_code == 200 and ok.json()["ok"] is True and "intact" in ok.json()["message"], ok.text
        # A plain form may carry the token as a field instead: past the CSRF check, this API
        # then wants JSON.
        assert client.post("/api/audit/verify", data={"csrf": str(me["csrf"])}).status_code == 415
    refusals = [line for line in console.server.log().splitlines() if "event=console_refused" in line]
    assert refusals and "reason=csrf" in refusals[0] and "level=warning" in refusals[0]
    assert len(refusals) < len(refused)  # at a bounded rate


def test_a_cookie_from_before_login_never_becomes_the_session(console: Console) -> None:
    planted = "attacker-chosen-" + "a" * 30
    cat = console.operator("cat", "viewer")
    with console.client() as client:
        assert client.get("/api/session", headers=_cookies({SESSION: planted})).status_code == 401
        csrf = _csrf_of_login_page(client)
        fields = {"operator": "cat", "password": PASSWORD, "otp": cat.code(), "csrf": csrf}
        answer = client.post("/login", data=fields, headers=_cookies({LOGIN: csrf, SESSION: planted}))
        assert answer.status_code == 303, answer.text
        issued = SimpleCookie(_set_cookie(answer, SESSION))[SESSION].value
        assert issued != planted
        assert client.get("/api/session", headers=_cookies({SESSION: issued})).status_code == 200
        # A live session sent to /login is ended and replaced, not carried over.
        csrf = _csrf_of_login_page(client)
        fields = {"operator": "cat", "password": PASSWORD, "otp": cat.code(), "csrf": csrf}
        second = client.post("/login", data=fields, headers=_cookies({LOGIN: csrf, SESSION: issued}))
        renewed = SimpleCookie(_set_cookie(second, SESSION))[SESSION].value
        assert renewed not in (issued, planted)
        assert client.get("/api/session", headers=_cookies({SESSION: renewed})).status_code == 200
        for old in (planted, issued):
            assert client.get("/api/session", headers=_cookies({SESSION: old})).status_code == 401
            page = client.get("/", headers=_cookies({SESSION: old}))
            assert page.status_code == 303 and page.headers["location"] == "/login?error=expired"


def test_logout_ends_the_session_for_good(console: Console) -> None:
    dan = console.operator("dan", "viewer")
    with console.client() as client:
        me = _log_in(client, dan)
        token = client.cookies.get(SESSION)
        assert token
        out = client.post("/logout", headers={"X-CSRF-Token": str(me["csrf"])})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert any("Max-Age=0" in h for h in out.headers.get_list("set-cookie") if h.startswith(f"{SESSION}="))
    with console.client() as replay:  # the old cookie, kept by someone
        old = _cookies({SESSION: token})
        assert replay.get("/api/session", headers=old).status_code == 401
        page = replay.get("/", headers=old)
        assert page.status_code == 303 and page.headers["location"] == "/login?error=expired"
        assert replay.get("/").headers["location"] == "/login"  # no cookie: nothing to explain
    assert "event=console_logout" in console.server.log()


def test_an_expired_session_answers_401(tmp_path: Path) -> None:
    server, base, setup = _start(tmp_path, "--console-session-ttl", "3s")
    try:
        person = add_operator(setup, tmp_path, "eve", "viewer")
        mini = Console(server, base, setup, tmp_path, person, person, "")
        with mini.client() as client:
            me = _log_in(client, person)
            left = _until(me["expires_at"]) - time.time()
            assert left <= 4
            token = client.cookies.get(SESSION)
            assert token
            time.sleep(max(0.0, left) + 1)
            # A browser drops the cookie by itself (its Max-Age was the certificate's remaining
            # life); the session must be dead on the server too, for a client that keeps it.
            kept = _cookies({SESSION: token})
            expired = client.get("/api/overview", headers=kept)
            assert expired.status_code == 401 and expired.json()["error"] == "unauthenticated"
            assert client.get("/", headers=kept).status_code == 303
            post = client.post("/api/audit/verify", headers={"X-CSRF-Token": str(me["csrf"]), **kept})
            assert post.status_code == 401
        assert re.search(r"level=warning .*event=console_refused reason=\"expired session\"", server.log())
    finally:
        server.stop()


# --- headers ---------------------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(console: Console) -> None:
    with console.client() as anonymous:
        answers = {"login page": anonymous.get("/login"), "redirect": anonymous.get("/"),
                   "401": anonymous.get("/api/session"), "static": anonymous.get("/static/app.css"),
                   "static 404": anonymous.get("/static/nope.css"), "csrf 403": anonymous.post("/api/audit/verify"),
                   "405": anonymous.put("/login")}
    with console.client() as client:
        me = _log_in(client, console.operator("fay", "auditor"))
        answers |= {"page": client.get("/"), "api": client.get("/api/overview"), "404": client.get("/nope"),
                    "api 404": client.get("/api/nope"),
                    "api 400": client.get("/api/graph", params={"since": "yesterday-ish"}),
                    "error from the server": client.get("/api/policies/revision", params={"revision": "999"}),
                    "post": client.post("/api/audit/verify", headers={"X-CSRF-Token": str(me["csrf"])})}
    for what, answer in answers.items():
        _has_security_headers(answer, what)
    assert answers["static"].status_code == 200 and answers["static 404"].status_code == 404
    assert answers["404"].status_code == 404 and answers["api 404"].status_code == 404
    assert answers["api 400"].status_code == 400 and answers["api 400"].json()["error"] == "invalid_argument"
    assert answers["error from the server"].status_code == 404
    assert answers["405"].status_code == 405
    assert "aiohttp" not in answers["page"].headers.get("server", "")


# --- roles ----------------------------------------------------------------------------------------


def test_a_viewer_cannot_approve_even_by_posting_directly(console: Console) -> None:
    with console.client() as client:
        me = _log_in(client, console.vic)
        assert me["roles"] == ["viewer"]
        listed = client.get("/api/access", params={"state": "pending"}).json()["requests"]
        assert [r["id"] for r in listed] == [console.pending] and listed[0]["state"] == "pending"
        posted = client.post(f"/api/access/{console.pending}/approve", headers={"X-CSRF-Token": str(me["csrf"])},
                             json={"otp": console.vic.code()})
        assert posted.status_code == 403 and posted.json()["error"] == "forbidden", posted.text
        # A viewer's overview leaves out what it may not read, rather than failing.
        overview = client.get("/api/overview").json()
        assert overview["policy"] is None and overview["anomalies_per_minute"] is None
        agents = overview["agents"]
        assert agents["total"] == agents["connected"] + agents["unreachable"] + agents["banned"]
    grants = json.loads(console.server.cli("access", "list", "--json", check=True).stdout)
    assert [g["state"] for g in grants if g["id"] == console.pending] == ["pending"]
    events = json.loads(console.server.cli("audit", "show", "--json", "--actor", "vic", check=True).stdout)
    denied = [e for e in events if e["kind"] == "admin.call" and e["outcome"] == "denied"]
    # The console acted as vic, with vic's certificate; it made no call vic's role cannot make
    # on its own (pages and the overview skip them), so the only denial is the approval.
    assert [e["subject"] for e in denied] == ["ApproveAccess"]


# --- the API's shapes ----------------------------------------------------------------------------


def test_the_json_api_answers_an_admin(console: Console) -> None:
    with console.client() as client:
        me = _log_in(client, console.ada)
        graph = client.get("/api/graph", params={"since": "1h"}).json()
        assert set(graph) >= {"since", "nodes", "edges"} and graph["nodes"] == [] and graph["edges"] == []
        overview = client.get("/api/overview").json()
        assert set(overview["agents"]) == {"connected", "unreachable", "banned", "total"}
        assert overview["ca"]["trust_domain"] == "example.org" and overview["ca"]["root_expires_at"].startswith("20")
        assert overview["pending_access"] == 1 and overview["quarantined"] == 0
        assert overview["denials_per_minute"] == 0 and overview["anomalies_per_minute"] == 0
        assert set(overview["policy"]) == {"revision", "agents_at_revision"}
        for path in ("/api/agents", "/api/identities", "/api/policies", "/api/anomalies", "/api/audit"):
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
        audit = client.get("/api/audit", params={"actor": "ada", "limit": "5"}).json()["events"]
        assert audit and audit[0]["seq"] > audit[-1]["seq"]  # newest first
        simulated = client.post("/api/policies/simulate", headers={"X-CSRF-Token": str(me["csrf"])},
                                json={"documents": "apiVersion: trustmesh/v1\nkind: Nonsense\n", "since": "7d"})
        assert simulated.status_code == 200 and simulated.json()["problems"], simulated.text

        # Live updates: the overview at once; at most four streams per session.
        with client.stream("GET", "/api/events") as first, client.stream("GET", "/api/events") as second, \
                client.stream("GET", "/api/events") as third, client.stream("GET", "/api/events") as fourth:
            assert first.status_code == second.status_code == third.status_code == fourth.status_code == 200
            assert first.headers["content-type"].startswith("text/event-stream")
            lines = first.iter_lines()
            assert next(lines) == "event: overview"
            assert set(json.loads(next(lines).removeprefix("data: "))) >= {"agents", "ca", "generated_at"}
            fifth = client.get("/api/events")
            assert fifth.status_code == 429


def test_agents_show_their_stream_and_the_policy_revision_they_enforce(console: Console, tmp_path: Path) -> None:
    server = console.server
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(sources="    - from: spiffe://example.org/payments\n"))
    server.cli("policy", "apply", str(policy), "--comment", "payments may use the ledger", check=True)
    policy.write_text(POLICY.format(sources="    - from: spiffe://example.org/payments\n"
                                            "    - from: spiffe://example.org/batch\n"))
    server.cli("policy", "apply", str(policy), "--comment", "and batch", check=True)
    server.cli("entry", "create", "--spiffe-id", LEDGER, "--node", "node-7", "--selector", "unix:uid:0", check=True)
    token = server.cli("token", "create", "--node", "node-7", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token).start()
    agent_id = "spiffe://example.org/agent/node-7"
    with console.client() as client:
        me = _log_in(client, console.operator("gus", "admin"))
        head = client.get("/api/policies").json()
        assert head["revisions"][0]["comment"] == "and batch" and head["revisions"][0]["revision"] == head["head"]

        def mine() -> dict[str, object] | None:
            found = [a for a in client.get("/api/agents").json()["agents"] if a["spiffe_id"] == agent_id]
            return found[0] if found else None

        try:
            assert wait_until(lambda: (mine() or {}).get("policy_revision") == head["head"]), mine()
            shown = mine()
            assert shown is not None and shown["state"] == "connected" and shown["node"] == "node-7"
            assert shown["address"] == "127.0.0.1" and str(shown["svid_expires_at"]).startswith("20")
            overview = client.get("/api/overview").json()
            assert overview["agents"]["connected"] >= 1 and overview["policy"]["revision"] == head["head"]
            assert overview["policy"]["agents_at_revision"] >= 1
            identity = client.get("/api/identity", params={"id": LEDGER}).json()
            assert [a["spiffe_id"] for a in identity["agents"]] == [agent_id]
            assert identity["entries"][0]["node"] == "node-7" and identity["quarantine"] is None
            assert identity["entries"][0]["selectors"] == ["unix:uid:0"]
            previous = head["revisions"][1]["revision"]
            diff = client.get("/api/policies/diff", params={"from": previous, "to": head["head"]}).json()
            assert "+- from: spiffe://example.org/batch" in diff["diff"].splitlines(), diff
            text = client.get("/api/policies/revision", params={"revision": head["head"]}).json()["documents"]
            assert "spiffe://example.org/batch" in text
            simulated = client.post("/api/policies/simulate", headers={"X-CSRF-Token": str(me["csrf"])},
                                    json={"documents": text, "since": "1h"}).json()
            assert simulated["problems"] == [] and {"judged", "would_deny", "unused_rules"} <= set(simulated)
        finally:
            agent.stop()
        # Its stream is gone with it.
        assert wait_until(lambda: (mine() or {}).get("state") == "unreachable"), mine()
        assert (mine() or {}).get("policy_revision") is None


