"""The demo a new user runs first must keep working, and must leave nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_stops_everything() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=180, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAILED" not in out
    assert "payments -> ledger over mTLS: ALLOWED" in out
    assert "frontend -> ledger: DENIED" in out
    assert "connection closed within" in out
    # A time window closing: Friday night's settlement window ends at 02:00 London time.
    assert "Saturday 01:59 London: ALLOW  ledger-access allow[0]" in out
    assert "Saturday 02:00 London: DENY  default deny: no active rule allows " \
           "spiffe://example.org/ns/batch/settlement; ledger-access allow[0] outside window mon-fri 22:00-02:00 " \
           "Europe/London" in out
    # Just-in-time access: requested by alice, refused to her, approved by bob, used, lapsed.
    assert "alice: logged in as spiffe://example.org/operator/alice" in out
    assert "alice approves her own: trustmesh: error:" in out and "someone else must approve" in out
    assert "bob: approved " in out and "frontend -> ledger: ALLOWED" in out
    assert "frontend -> ledger after the grant's end: DENIED" in out
    assert "access.approve ok: by spiffe://example.org/operator/bob (role security-officer" in out
    assert "audit log intact" in out
    # The service graph of the demo's own traffic, and a suggestion that replays clean.
    assert "spiffe://example.org/payments -> spiffe://example.org/ledger:" in out and "flowchart LR" in out
    assert '- from: "spiffe://example.org/payments"' in out
    assert "policy simulate proposed/: no observed flow would be denied" in out
    assert "the forged one is not used" in out and "audit verify (exit 1): audit log BROKEN" in out
    # It ends with an identity going rogue, quarantined with its explanation, then released.
    assert "QUARANTINED spiffe://example.org/payments by the deny_burst detector" in out
    assert "connections denied in 5 min (latest to spiffe://example.org/fx" in out
    assert "its open connection: cut; payments -> ledger now: DENIED" in out
    assert "released spiffe://example.org/payments" in out
    assert "payments -> ledger after the release: ALLOWED" in out
    # A legacy HTTP core: a read-only rule lets fraud-scoring's GET through, its POST gets a 403.
    assert "GET  /transactions/42 -> 200; the core read the caller from X-Trustmesh-Peer-Id: " \
           "spiffe://example.org/fraud-scoring" in out
    assert "POST /transactions/42 -> 403 denied: rule 'default deny'" in out
    assert "no rule of ledger-read allows POST from spiffe://example.org/fraud-scoring" in out
    # `trustmesh check` at the end: every check passes on the demo's mesh.
    assert "√ agents connected: 2 of 2 connected" in out and "checks passed" in out and "× " not in out
    assert "√ OIDC discovery reachable: https://127.0.0.1:" in out
    # Step 19: the CA keys of a second control plane, seen in the token by OpenSC's own tool.
    assert "root " in out and "key in the HSM, not in the store" in out
    assert "2 private keys, sensitive, always sensitive, never extractable" in out
    assert out.rstrip().endswith("demo finished; everything stopped.")
    leftovers = subprocess.run(["pgrep", "-f", "trustmesh-demo-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "the demo left processes running"
