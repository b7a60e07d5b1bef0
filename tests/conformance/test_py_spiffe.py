"""An independent SPIFFE client (py-spiffe) works against the agent unchanged.

py-spiffe carries its own copy of the standard Workload API proto; it runs in a separate
process, pointed at the agent's socket, exactly as a workload would use it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import AgentProcess, ServerProcess

HERE = Path(__file__).resolve().parent


def test_py_spiffe_fetches_and_validates(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    # Never import it here: its proto would clash with ours in this process.
    if importlib.util.find_spec("spiffe") is None:
        pytest.fail("py-spiffe is missing; it is a dev dependency that scripts/test installs")
    server = make_server()
    token = server.cli("token", "create", "--node", "node-1", check=True).stdout.strip()
    server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/payments", "--node", "node-1",
               "--selector", f"unix:uid:{os.getuid()}", check=True)
    agent = AgentProcess(server, tmp_path / "agent", join_token=token).start()
    try:
        out = subprocess.run([sys.executable, str(HERE / "pyspiffe_client.py"), f"unix://{agent.socket}"],
                             capture_output=True, text=True, timeout=120)
    finally:
        agent.stop()
    assert out.returncode == 0, out.stderr
    facts = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert facts["x509_svid"] == "spiffe://example.org/payments"
    assert facts["context_svids"] == "1"
    assert int(facts["x509_bundle_authorities"]) >= 1
    assert facts["jwt_svid"] == "spiffe://example.org/payments"
    assert facts["jwt_audience"] == "audit,payments"
    assert facts["jwt_validated"] == "spiffe://example.org/payments"
    assert int(facts["jwt_authorities"]) >= 1
    assert facts["x509_source"] == facts["jwt_source"] == "spiffe://example.org/payments"
