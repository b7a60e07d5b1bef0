"""An independent SPIFFE client (py-spiffe) against our Workload API server, unchanged.

py-spiffe carries its own copy of the standard's proto and registers the same global
message names as ours, so it runs in a subprocess (pyspiffe_steps.py), found through
SPIFFE_ENDPOINT_SOCKET exactly as a workload finds the agent. The server runs in this
process over the in-test IdentitySource of the unit tests, so each step can change what
the server holds: a rotation must reach py-spiffe's X509Source on its open stream, and a
deleted entry must reach a watcher as PermissionDenied, not as a clean end.
(tests/conformance/test_py_spiffe.py runs py-spiffe against a real agent process.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_workload_api import PARTNER, Authority, FakeSource, Served, _serve
from trustmesh.spiffeid import TrustDomain

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TD = TrustDomain("example.org")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    # Never import spiffe here: its proto would clash with ours in this process.
    if importlib.util.find_spec("spiffe") is None:
        pytest.fail("py-spiffe is missing; it is a dev dependency (pip install 'spiffe>=0.3.2')")
    directory = Path(tempfile.mkdtemp(prefix="tmcf", dir="/tmp"))  # short: a socket path is <= 108 bytes
    s = await _serve(directory, FakeSource(Authority.make(TD), Authority.make(PARTNER)))
    yield s
    await s.channel.close()
    await s.server.close()
    shutil.rmtree(directory, ignore_errors=True)


class Steps:
    """The py-spiffe process: read its JSON lines, send it cues."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def next(self, step: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            raise AssertionError(f"py-spiffe ended before {step!r}: {err.decode()[-3000:]}")
        facts: dict[str, Any] = json.loads(line)
        assert facts.pop("step") == step
        return facts

    async def cue(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        await self.proc.stdin.drain()


async def test_py_spiffe_fetches_watches_and_is_denied(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger", federates_with=(PARTNER,))
    partner_token = source.partner.jwt("settlement", ["ledger"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "pyspiffe_steps.py"), partner_token,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{served.path}", "PYTHONPATH": str(REPO)})
    steps = Steps(proc)
    try:
        facts = await steps.next("facts")
        assert facts == {
            "x509_svid": "spiffe://example.org/ledger",
            "x509_key": facts["x509_key"],
            "x509_chain": 1,
            "context_svids": ["spiffe://example.org/ledger"],
            "context_bundles": ["example.org", "partner.example"],  # ours + federates_with
            "x509_bundles": ["example.org", "partner.example"],
            "jwt_svid": "spiffe://example.org/ledger",
            "jwt_audience": ["audit", "payments"],
            "jwt_only": "spiffe://example.org/ledger",
            "validated": "spiffe://example.org/ledger",
            "partner": "spiffe://partner.example/settlement",
            "jwt_kids": {"example.org": ["kid-example.org"], "partner.example": ["kid-partner.example"]},
        }
        assert "PrivateKey" in facts["x509_key"]

        first = (await steps.next("source"))["serial"]
        assert first == source.svids["e1"].leaf.serial_number
        rotated = source.rotate("e1")
        await steps.cue("rotated")
        assert (await steps.next("rotated"))["serial"] == rotated.leaf.serial_number

        assert (await steps.next("jwt_source"))["kids"] == ["kid-example.org"]

        await steps.next("watching")
        source.delete("e1")
        await steps.cue("deleted")
        assert "PERMISSION_DENIED" in (await steps.next("denied"))["error"]
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
