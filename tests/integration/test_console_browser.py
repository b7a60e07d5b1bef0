"""The web console (issue 19) in a real browser: headless Chromium driven by Selenium against a
real server with a real agent, real traffic through its listeners, and operators enrolled and
logged in as people are, with TOTP codes computed here from the secrets they enrolled with.

One server, one agent and three operators for the whole module: ada (admin) logs in through
the form and reads every page; sol (security officer) approves ada's access request in the
browser; vic (viewer) cannot approve, not even by posting to the API directly; ada releases the
quarantine sol put with the CLI. One browser per operator. Every page is screenshotted
(console_kit: $TM_ARTIFACTS/console/, or the module's tmp directory; TM_SCREENSHOTS=1 also
refreshes docs/console/ for the README)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI a missing dev dependency is an error, not a skip
    pytest.importorskip("selenium", reason="selenium is not installed (scripts/test installs the dev dependencies)")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402

from tests.etcd_process import free_port  # noqa: E402
from tests.integration.console_kit import (  # noqa: E402
    Browser,
    Browsers,
    artifacts_dir,
    browsers,
    css_string,
    require_browser,
)
from tests.integration.harness import AgentProcess, ServerProcess, echo_server, wait_until  # noqa: E402
from tests.integration.operators_kit import PASSWORD, Operator, add_operator, audit  # noqa: E402
from tests.integration.test_enforcement import _talk  # noqa: E402

pytestmark = pytest.mark.slow

TD = "spiffe://example.org"
LEDGER, PAYMENTS, FRONTEND, BATCH = (f"{TD}/{n}" for n in ("ledger", "payments", "frontend", "batch"))
DEBUG = f"{TD}/ns/ops/debug"
SELF_EXE = os.path.realpath(sys.executable)
PAGES = ("/", "/graph", "/agents", "/identities", "/policies", "/access", "/anomalies", "/audit")
QUARANTINE_REASON = "INC-4711: batch credential seen off the mesh"
POLICY = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [{port}]
  allow:
{rules}"""


@dataclass
class Estate:
    server: ServerProcess
    agent: AgentProcess
    base: str  # https://localhost:PORT
    artifacts: Path
    ada: Operator  # admin
    sol: Operator  # security officer
    vic: Operator  # viewer
    to_approve: str  # ada's access request, for sol
    pending: str  # ada's other access request, which vic tries to approve
    revisions: list[int]  # policy revisions, oldest first
    agent_id: str
    ledger_port: int


def _policy(server: ServerProcess, path: Path, port: int, comment: str, *sources: str) -> None:
    path.write_text(POLICY.format(port=port, rules="".join(f"    - from: {s}\n" for s in sources)))
    server.cli("policy", "apply", str(path), "--comment", comment, check=True)


def _request(person: Operator, port: int) -> str:
    result = person.run("access", "request", "--from", DEBUG, "--to", LEDGER, "--port", str(port), "--for", "30m",
                        "--reason", "INC-4711: reconcile the ledger")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _access(server: ServerProcess) -> dict[str, dict[str, object]]:
    return {g["id"]: g for g in json.loads(server.cli("access", "list", "--json", check=True).stdout)}


def _edge(server: ServerProcess, source: str, destination: str, decision: str) -> bool:
    flows = json.loads(server.cli("flows", "--since", "1h", "--json", check=True).stdout)
    return any(f["source"] == source and f["destination"] == destination and f["decision"] == decision
               for f in flows)


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Estate]:
    require_browser()  # before minutes of set-up that would be for nothing
    tmp = tmp_path_factory.mktemp("console")
    with ExitStack() as stack:
        server = ServerProcess(data_dir=tmp / "server", extra=[
            "--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0", "--console-bind", "127.0.0.1:0",
            "--flow-rollup-interval", "1s"])
        stack.callback(server.stop)
        server.start()
        log = server.log()
        admin_bind, login_bind, console = (re.search(rf"\b{name}=(\S+)", log)
                                           for name in ("admin_bind", "login_bind", "console_bind"))
        assert admin_bind and login_bind, log[-2000:]
        assert console, f"the server's event=ready line names no console_bind=HOST:PORT:\n{log[-2000:]}"
        base = f"https://localhost:{console.group(1).rpartition(':')[2]}"
        setup = (server, admin_bind.group(1), login_bind.group(1))

        echo_port, stop_echo = echo_server()
        stack.callback(stop_echo.set)
        ledger_port, pay_port, front_port = free_port(), free_port(), free_port()
        config = tmp / "agent.yaml"
        agent = AgentProcess(server, tmp / "agent", config=config)
        stack.callback(agent.stop)

        def traffic() -> tuple[list[int], str]:
            """Entries and two policy revisions; the agent; allowed and denied connections through
            its listeners, until the server has the flows. The policy revisions, oldest first, and
            the agent's SPIFFE ID."""
            # The test process is the services' caller: their entries name it (uid and binary).
            for sid in (LEDGER, PAYMENTS, FRONTEND, BATCH):
                server.cli("entry", "create", "--spiffe-id", sid, "--node", "node-1", "--selector",
                           f"unix:uid:{os.getuid()}", "--selector", f"unix:path:{SELF_EXE}", check=True)
            _policy(server, tmp / "policy.yaml", ledger_port, "payments may use the ledger", PAYMENTS)
            _policy(server, tmp / "policy.yaml", ledger_port, "batch jobs reconcile the ledger", PAYMENTS, BATCH)
            history = server.cli("policy", "history", check=True).stdout
            config.write_text(f"""\
services:
  - name: ledger
    spiffe_id: {LEDGER}
    inbound: {{listen: 127.0.0.1:{ledger_port}, forward: 127.0.0.1:{echo_port}}}
  - name: payments
    spiffe_id: {PAYMENTS}
    outbound:
      - {{listen: 127.0.0.1:{pay_port}, connect: 127.0.0.1:{ledger_port}, expect: {LEDGER}}}
  - name: frontend
    spiffe_id: {FRONTEND}
    outbound:
      - {{listen: 127.0.0.1:{front_port}, connect: 127.0.0.1:{ledger_port}, expect: {LEDGER}}}
""")
            agent.join_token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
            agent.start()
            assert wait_until(lambda: "inbound_listening" in agent.log()
                             and agent.log().count("outbound_listening") >= 2)
            for _ in range(3):
                assert _talk(pay_port) == b"hello ledger"  # allowed by ledger-access
            for _ in range(2):
                assert _talk(front_port) == b""  # denied: no rule lets the frontend in
            for _ in range(60):  # the agent reports every 2 s; each look is a CLI process, so not too often
                if _edge(server, PAYMENTS, LEDGER, "allow") and _edge(server, FRONTEND, LEDGER, "deny"):
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("the agent's flows never reached the server")
            (record,) = json.loads(server.cli("agent", "list", "--json", check=True).stdout)
            return sorted(int(line.split()[0]) for line in history.splitlines() if line.strip()), record["spiffe_id"]

        def ada_asks() -> tuple[Operator, str, str]:  # the CLI: ada asks for access twice
            ada = add_operator(setup, tmp, "ada", "admin")
            assert (result := ada.login()).returncode == 0, result.stderr
            return ada, _request(ada, 5432), _request(ada, 5433)

        def sol_quarantines() -> Operator:  # the CLI: sol puts batch in quarantine
            sol = add_operator(setup, tmp, "sol", "security-officer")
            assert (result := sol.login()).returncode == 0, result.stderr
            added = sol.run("quarantine", "add", BATCH, "--reason", QUARANTINE_REASON)
            assert added.returncode == 0, added.stderr
            return sol

        # Each part waits on processes of its own: side by side, the set-up takes half as long.
        with ThreadPoolExecutor(4) as parts:
            mesh, asked, quarantined = parts.submit(traffic), parts.submit(ada_asks), parts.submit(sol_quarantines)
            vic = parts.submit(add_operator, setup, tmp, "vic", "viewer").result()
            (ada, to_approve, pending), sol = asked.result(), quarantined.result()
            revisions, agent_id = mesh.result()
        yield Estate(server, agent, base, artifacts_dir(tmp / "artifacts"), ada, sol, vic, to_approve, pending,
                     revisions, agent_id, ledger_port)


@pytest.fixture(scope="module")
def pool(estate: Estate) -> Iterator[Browsers]:
    yield from browsers(estate.base, estate.artifacts)


@pytest.fixture(scope="module")
def ada_browser(pool: Browsers) -> Browser:
    return pool.start("ada")


@pytest.fixture(scope="module")
def sol_browser(pool: Browsers) -> Browser:
    return pool.start("sol")


@pytest.fixture(scope="module")
def vic_browser(pool: Browsers) -> Browser:
    return pool.start("vic")


def login(browser: Browser, person: Operator) -> None:
    """Log `person` in through the form, as a person would; on to the overview."""
    browser.open("/login", "#login-form")
    code = person.code()  # may wait for the next TOTP step: before typing, not while the form waits
    for name, value in (("operator", person.name), ("password", PASSWORD), ("otp", code)):
        field = browser.present(f'#login-form input[name="{name}"]')
        field.clear()
        field.send_keys(value)
    browser.present("#login-submit").click()

    def outcome(_: object) -> str | None:
        error = browser.find("#login-error")
        if error is not None and error.is_displayed() and error.text.strip():
            return f"refused: {error.text.strip()}"
        if browser.path() in ("/", "") and browser.find("#overview") is not None:
            return "ok"
        body = browser.find("body")
        if browser.find("#login-form") is None and body is not None and body.text.startswith('{"error"'):
            return f"answered {body.text}"  # the POST's own answer: no page to wait for
        return None

    result = browser.wait(outcome, f"the overview after {person.name} logs in")
    assert result == "ok", f"{person.name} could not log in: {result}\n{browser.diagnosis()}"
    browser.text_of("#whoami", lambda t: person.name in t, f"to name {person.name}")
    browser.logged_in_as = person.name


def signed_in(browser: Browser, person: Operator) -> Browser:
    if browser.logged_in_as != person.name:
        login(browser, person)
    return browser


def no_csp_violations(browser: Browser) -> None:
    refused = [e["message"] for e in browser.console_log() if "Content Security Policy" in str(e.get("message"))]
    assert not refused, f"the page broke its own Content-Security-Policy: {refused[:5]}"


def row(table: str, **attrs: str) -> str:
    return f"#{table} tr" + "".join(f"[data-{k.replace('_', '-')}={css_string(v)}]" for k, v in attrs.items())


# --- 1. log in through the form, see the overview ---------------------------------------------

def test_login_form_and_overview(estate: Estate, ada_browser: Browser) -> None:
    b = ada_browser
    b.open("/login", "#login-form", "#login-submit")
    form = b.present("#login-form")
    assert (form.get_attribute("method") or "").lower() == "post"
    assert (form.get_attribute("action") or "").endswith("/login")
    for name in ("operator", "password", "otp"):
        field = b.present(f'#login-form input[name="{name}"]')
        ident = field.get_attribute("id")
        assert ident, f"the {name} input has no id for its <label for>"
        label = b.find(f"label[for={css_string(ident)}]")
        assert label is not None and (label.get_attribute("textContent") or "").strip(), \
            f"the {name} input has no <label for={ident}>"
    assert b.find('#login-form input[type="hidden"][name="csrf"]') is not None, "no hidden csrf field"
    csrf = b.present('#login-form input[name="csrf"]').get_attribute("value") or ""
    assert len(csrf) >= 32 and "{{" not in csrf, f"the login form's csrf field was not filled in: {csrf!r}"
    b.screenshot("login")

    login(b, estate.ada)
    session = b.driver.get_cookie("__Host-tm_session")
    assert session is not None, f"no __Host-tm_session cookie after login: {b.driver.get_cookies()}"
    assert session["secure"] and session["httpOnly"] and session.get("sameSite") == "Strict", session
    assert session["path"] == "/" and not str(session.get("domain", "")).startswith("."), session  # host-only

    b.visible("#overview")
    b.text_of("#agents-connected", lambda t: t.strip() == "1", "to count the one connected agent")
    b.text_of("#agents-unreachable", lambda t: t.strip() == "0", "to be 0")
    b.text_of("#agents-banned", lambda t: t.strip() == "0", "to be 0")
    b.text_of("#policy-revision", lambda t: str(estate.revisions[-1]) in t, f"to show revision {estate.revisions[-1]}")
    b.text_of("#denials-per-minute", lambda t: bool(t.strip()), "to show a number")
    b.text_of("#root-expires", lambda t: bool(re.search(r"20\d\d", t)), "to show when the root expires")
    b.text_of("#whoami", lambda t: "ada" in t and "admin" in t, "to show the operator and the role")
    b.text_of("#live-status", lambda t: bool(re.search(r"(?<!dis)connected", t)),
              "to say that live updates are connected")
    assert b.find("button#logout") is not None, "no <button id=logout>"
    for page in PAGES:
        assert b.find(f'#nav a[href="{page}"]') is not None, f"the nav has no link to {page}"
    b.screenshot("overview")
    no_csp_violations(b)


# --- 2. the graph: edges, details, and the other pages an admin reads ----------------------------

def test_graph_edges_and_their_details(estate: Estate, ada_browser: Browser) -> None:
    b = signed_in(ada_browser, estate.ada)
    b.open("/graph", "#graph", "#edges")
    allowed = row("edges", source=PAYMENTS, destination=LEDGER, decision="allow")
    denied = row("edges", source=FRONTEND, destination=LEDGER, decision="deny")
    b.visible(allowed)
    b.present(denied)
    since = Select(b.present("select#since"))
    assert {"15m", "1h", "24h", "7d"} <= {o.get_attribute("value") for o in since.options}
    assert b.find("select#team") is not None, "no <select id=team>"
    b.present("#graph canvas")  # cytoscape drew the graph (its script ran under the CSP)

    b.present(allowed).click()
    details = b.text_of("#edge-details", lambda t: "ledger-access allow[0]" in t,
                        "to show the deciding rule of payments -> ledger")
    assert str(estate.ledger_port) in details, details
    b.screenshot("graph")
    b.present(denied).click()
    b.text_of("#edge-details", lambda t: "default deny" in t, "to show why frontend -> ledger was denied")
    no_csp_violations(b)


def test_agents_identities_and_policies(estate: Estate, ada_browser: Browser) -> None:
    b = signed_in(ada_browser, estate.ada)
    b.open("/agents", "#agents")
    b.visible(row("agents", agent=estate.agent_id))
    b.screenshot("agents")

    b.open("/identities", "#identities")
    for sid in (LEDGER, PAYMENTS, FRONTEND, BATCH):
        b.present(row("identities", spiffe_id=sid))
    b.screenshot("identities")

    b.open("/policies", "#revisions")
    b.text_of("#revisions", lambda t: "batch jobs reconcile the ledger" in t, "to list the revisions with comments")
    first, last = (str(r) for r in (estate.revisions[0], estate.revisions[-1]))
    b.wait(lambda d: len(Select(b.present("select#diff-to")).options) >= 2, "the revisions in #diff-from/#diff-to")
    Select(b.present("select#diff-from")).select_by_value(first)
    Select(b.present("select#diff-to")).select_by_value(last)
    b.present("button#diff").click()
    b.text_of("#diff-output", lambda t: any(line.startswith("+") and BATCH in line for line in t.splitlines()),
              "to show the added rule as a unified diff")

    candidate = b.present("textarea#candidate")
    ident = candidate.get_attribute("id")
    assert b.find(f'label[for="{ident}"]') is not None or candidate.get_attribute("aria-label"), \
        "#candidate has no label"
    assert b.find("select#simulate-since") is not None, "no <select id=simulate-since>"
    candidate.clear()
    candidate.send_keys(POLICY.format(port=estate.ledger_port, rules=f"    - from: {BATCH}\n"))
    b.present("button#simulate").click()
    b.text_of("#simulate-output", lambda t: PAYMENTS in t,
              "to say the candidate would deny payments -> ledger, which was observed")
    b.screenshot("policies")
    no_csp_violations(b)


# --- 3. four eyes: sol approves ada's request in the browser --------------------------------------

def test_security_officer_approves_with_a_one_time_code(estate: Estate, sol_browser: Browser) -> None:
    b = signed_in(sol_browser, estate.sol)
    b.open("/access", "#access")
    request = b.visible(row("access", id=estate.to_approve, state="pending"))
    b.screenshot("access")
    request.find_element(By.CSS_SELECTOR, "button.approve").click()
    dialog = b.visible("dialog#otp-dialog")
    assert dialog.get_attribute("open") is not None
    b.visible("#otp-input").send_keys(estate.sol.code())
    b.present("button#otp-submit").click()
    b.visible(row("access", id=estate.to_approve, state="active"))
    b.text_of("#access-message", lambda t: bool(t.strip()), "to say the request was approved")
    b.screenshot("access-approved")

    grant = _access(estate.server)[estate.to_approve]
    assert grant["state"] == "active" and grant["approvals"] == [f"{TD}/operator/sol"], grant
    no_csp_violations(b)


# --- 4. a quarantine released with a reason and a code ------------------------------------------------

def test_quarantine_release_with_reason_and_code(estate: Estate, ada_browser: Browser) -> None:
    b = signed_in(ada_browser, estate.ada)
    b.open("/anomalies", "#quarantines")
    b.present("#anomalies")  # the recent anomalies: none here, so maybe an empty list
    quarantined = row("quarantines", target=BATCH)
    entry = b.visible(quarantined)
    assert "INC-4711" in entry.text, f"the quarantine's reason is not shown: {entry.text!r}"
    b.screenshot("anomalies")
    entry.find_element(By.CSS_SELECTOR, "button.release").click()
    b.visible("dialog#release-dialog")
    b.visible("#release-reason").send_keys("INC-4711 closed: the credential was rotated")
    b.visible("#release-otp").send_keys(estate.ada.code())
    b.present("button#release-submit").click()
    b.gone(quarantined)
    b.text_of("#anomalies-message", lambda t: bool(t.strip()), "to say the quarantine was released")

    assert json.loads(estate.server.cli("quarantine", "list", "--json", check=True).stdout) == []
    (release,) = audit(estate.server, "--kind", "quarantine.release")
    assert release["actor"] == f"{TD}/operator/ada", release  # the console acted as ada, with her certificate
    no_csp_violations(b)


# --- 5. the audit log: search, and verify the chain -------------------------------------------------

def test_audit_search_and_chain_verification(estate: Estate, ada_browser: Browser) -> None:
    b = signed_in(ada_browser, estate.ada)
    b.open("/audit", "#audit-search", "#audit-events")
    b.present("#audit-events tr[data-seq]")
    for name in ("actor", "kind", "subject", "since"):
        assert b.find(f"#audit-search #{name}") is not None, f"#audit-search has no #{name}"
    b.present("#actor").clear()
    b.present("#actor").send_keys("sol")
    b.present("#kind").clear()
    b.present("#kind").send_keys("quarantine.add")
    submit = b.find('#audit-search [type="submit"], #audit-search button:not([type])')
    assert submit is not None, "#audit-search has no submit button"
    submit.click()

    def only_sols_quarantine(_: object) -> bool:
        rows = b.driver.find_elements(By.CSS_SELECTOR, "#audit-events tr[data-seq]")
        return bool(rows) and all("quarantine.add" in r.text for r in rows) and BATCH in rows[0].text
    b.wait(only_sols_quarantine, "#audit-events to show only sol's quarantine.add of batch")

    b.present("button#verify").click()
    b.text_of("#verify-result", lambda t: "intact" in t.lower(), "to say the chain is intact")
    b.screenshot("audit")
    no_csp_violations(b)


# --- 6. a viewer cannot approve, not even by posting to the API ----------------------------------------

def test_viewer_cannot_approve_even_by_posting_directly(estate: Estate, vic_browser: Browser) -> None:
    b = signed_in(vic_browser, estate.vic)
    b.open("/access", "#access")
    pending = b.visible(row("access", id=estate.pending, state="pending"))
    for button in pending.find_elements(By.CSS_SELECTOR, "button.approve"):
        assert not button.is_displayed(), "a viewer is offered an approve button"
    b.screenshot("access-viewer")

    session = b.fetch("/api/session")
    assert session["status"] == 200, session
    me = json.loads(session["body"])
    assert me["operator"] == "vic" and me["roles"] == ["viewer"], me
    url = f"/api/access/{estate.pending}/approve"
    # Without the CSRF header: refused before anything else.
    forged = b.fetch(url, "POST", {"Content-Type": "application/json"}, {"otp": "000000"})
    assert forged["status"] == 403 and '"csrf"' in forged["body"], forged
    # With it and a valid code: the server's role table says no.
    posted = b.fetch(url, "POST", {"X-CSRF-Token": me["csrf"], "Content-Type": "application/json"},
                     {"otp": estate.vic.code()})
    assert posted["status"] == 403, posted
    assert _access(estate.server)[estate.pending]["state"] == "pending"

    b.present("button#logout").click()
    b.wait(lambda d: b.path().startswith("/login"), "the login page after logging out")
    gone = b.fetch("/api/session")
    assert gone["status"] == 401, gone
    no_csp_violations(b)


# --- 7. keyboard and 200 % zoom ----------------------------------------------------------------------

def test_keyboard_order_and_200_percent_zoom(estate: Estate, pool: Browsers, ada_browser: Browser) -> None:
    anonymous = pool.start("anonymous")
    anonymous.open("/login", "#login-form")
    wanted = ["operator", "password", "otp", "login-submit"]
    reached: list[str] = []
    for press in range(21):
        if press:  # the first look is at what has the focus on arrival (autofocus, say)
            ActionChains(anonymous.driver).send_keys(Keys.TAB).perform()
        focused = anonymous.driver.switch_to.active_element
        ident, field = focused.get_attribute("id") or "", focused.get_attribute("name") or ""
        name = ident if ident == "login-submit" else field or ident or focused.tag_name
        reached.append(name)
        if name in wanted and press:
            ring = anonymous.js("const s = getComputedStyle(arguments[0]);"
                                "return [s.outlineStyle, s.outlineWidth, s.boxShadow];", focused)
            assert (ring[0] != "none" and ring[1] != "0px") or ring[2] != "none", \
                f"focus on {name} is not visible (outline {ring[0]} {ring[1]}, box-shadow {ring[2]})"
        if name == "login-submit":
            break
    in_order = [n for n in reached if n in wanted]
    assert in_order[:4] == wanted, f"Tab reached {reached}"

    anonymous.zoom(2)
    anonymous.open("/login", "#login-form")
    assert anonymous.in_view("#login-form") and anonymous.in_view("#login-submit")
    fits(anonymous, "/login")
    anonymous.screenshot("login-200pct")

    b = signed_in(ada_browser, estate.ada)
    b.zoom(2)
    try:
        for path, hook, name in (("/", "#overview", "overview"), ("/graph", "#edges", "graph"),
                                 ("/access", "#access", "access"), ("/audit", "#audit-events", "audit")):
            b.open(path, "#nav", hook)
            assert b.in_view("#nav"), f"the nav is not visible on {path} at 200%"
            assert b.in_view(hook), f"{hook} is not visible on {path} at 200%"
            fits(b, path)
            b.screenshot(f"{name}-200pct")
    finally:
        b.zoom(1)


def fits(browser: Browser, path: str) -> None:
    """No horizontal scrolling of the page itself (a wide table may scroll inside its container)."""
    measured = browser.overflow()
    assert measured["scroll_width"] <= measured["viewport_width"] + 1, \
        f"{path} overflows the viewport horizontally at 200%: {measured}"
