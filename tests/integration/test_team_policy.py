"""Team-owned allowlists through the CLI, with a policy-author logged in over real mTLS: its
team's apply leaves every other team's allowlists untouched; a destination its team does not
own is refused, in a team apply or a whole-policy apply."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.harness import ServerProcess
from tests.integration.operators_kit import add_operator, audit, one_line
from tests.unit.test_policy_ownership import OWNERS, allowlist


def test_a_policy_author_writes_only_its_teams_allowlists(admin_server: tuple[ServerProcess, str, str],
                                                          tmp_path: Path) -> None:
    server = admin_server[0]
    (tmp_path / "owners.yaml").write_text(OWNERS)
    assert "3 team(s)" in server.cli("policy", "owners", "--set", str(tmp_path / "owners.yaml"), check=True).stdout
    whole = tmp_path / "whole.yaml"
    whole.write_text(allowlist("ledger", "spiffe://example.org/ledger")
                     + allowlist("fraud", "spiffe://example.org/fraud/*"))
    server.cli("policy", "apply", str(whole), check=True)

    pat = add_operator(admin_server, tmp_path, "pat", "policy-author", team="payments")
    assert pat.login().returncode == 0
    owners = pat.run("policy", "owners")
    assert owners.returncode == 0 and "payments" in owners.stdout and "spiffe://example.org/ledger" in owners.stdout
    assert json.loads(pat.run("policy", "owners", "--json").stdout)["updated_by"].startswith("local-root")

    team_dir = tmp_path / "payments"
    team_dir.mkdir()
    (team_dir / "ledger.yaml").write_text(allowlist("ledger", "spiffe://example.org/ledger",
                                                    "spiffe://example.org/batch"))
    diff = pat.run("policy", "diff", str(team_dir), "--team", "payments")
    assert diff.returncode == 0 and "spiffe://example.org/batch" in diff.stdout, diff.stderr
    assert not [line for line in diff.stdout.splitlines() if line[:1] in "+-" and "fraud" in line]
    applied = pat.run("policy", "apply", str(team_dir), "--team", "payments", "--comment", "batch reads ledger")
    assert applied.returncode == 0 and "applied as revision 2" in applied.stdout, applied.stderr
    shown = server.cli("policy", "show", check=True).stdout
    assert "spiffe://example.org/batch" in shown and "destination: spiffe://example.org/fraud/*" in shown

    (team_dir / "fraud.yaml").write_text(allowlist("fraud-2", "spiffe://example.org/fraud/model"))
    one_line(pat.run("policy", "apply", str(team_dir), "--team", "payments"), 1, "does not own", "fraud-2")
    (team_dir / "fraud.yaml").unlink()
    sneaky = tmp_path / "sneaky.yaml"  # the whole policy, with risk's allowlist opened to an attacker
    sneaky.write_text(allowlist("ledger", "spiffe://example.org/ledger", "spiffe://example.org/batch")
                      + allowlist("fraud", "spiffe://example.org/fraud/*", "spiffe://example.org/attacker"))
    one_line(pat.run("policy", "apply", str(sneaky)), 1, "may change only allowlists", "fraud")
    one_line(pat.run("policy", "apply", str(team_dir), "--team", "risk"), 1, "only allowlists of your team payments")
    one_line(pat.run("policy", "owners", "--set", str(tmp_path / "owners.yaml"), "--otp", pat.code()), 1,
             "does not hold a role")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(pat.run("policy", "apply", str(empty), "--team", "payments"), 1, "--allow-empty")
    assert len(server.cli("policy", "history", check=True).stdout.splitlines()) == 2

    applies = audit(server, "--kind", "policy.apply", "--actor", "pat")
    ok = [e for e in applies if e["outcome"] == "ok"]
    assert len(ok) == 1 and isinstance(ok[0]["details"], dict) and ok[0]["details"]["team"] == "payments"
    assert ok[0]["details"]["role"] == "policy-author"
    assert len([e for e in applies if e["outcome"] == "denied"]) == 3
