"""X.509-SVID issuance with the signing CA's key in a SoftHSM2 token, against a software key.

Both servers are real `trustmesh server run` processes on SQLite in this run, signing in the
server process (`--signing-workers 0`: a key in the token cannot be handed to worker
processes): one with `--key-manager pkcs11 --pkcs11-signing-ca` (every leaf is signed by a
PKCS#11 C_Sign call on the token), one with the default sealed software keys. The ratio is
the cost of the PKCS#11 path (hash here, sign in the token, re-encode the signature, one
session under a lock). SoftHSM2 is itself software, so this is the protocol's overhead, not
a hardware HSM's speed: a network HSM adds its round trip to each leaf.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import row  # noqa: E402
from benchmarks.issuance import measure  # noqa: E402
from tests.hsm import make_softhsm  # noqa: E402
from tests.integration.harness import ServerProcess  # noqa: E402
from trustmesh.keys import generate_private_key  # noqa: E402
from trustmesh.x509svid import build_csr  # noqa: E402


def run(quick: bool) -> list[dict[str, object]]:
    seconds, rounds = (0.5, 5) if quick else (10.0, 200)
    csrs = [build_csr(generate_private_key()) for _ in range(64)]
    got: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-hsm-") as tmp:
        hsm = make_softhsm(Path(tmp) / "hsm")
        for name, extra, env in (("software", [], {}),
                                 ("softhsm", hsm.server_flags(signing_ca=True), hsm.env)):
            server = ServerProcess(data_dir=Path(tmp) / name, extra=["--signing-workers", "0", *extra],
                                   env={"TRUSTMESH_KEK": "44" * 32, **env})
            server.start()
            try:
                got[name] = asyncio.run(measure(server, csrs, seconds, rounds))
            finally:
                server.stop()
    params = {"store": "sqlite", "batch": 100, "signing_workers": 0, "token": "SoftHSM2 2.6 (software)",
              "mechanism": "CKM_ECDSA over a SHA-256 digest, P-256", "seconds": seconds}
    return [
        row("hsm.issuance.rate", got["softhsm"]["rate"], "SVIDs/s",
            "software signing key, same server build, same run", got["software"]["rate"], "report", params),
        row("hsm.issuance.batch1.latency_p50", got["softhsm"]["p50_1"] * 1000, "ms",
            "software signing key, same run", got["software"]["p50_1"] * 1000, "report", {"rounds": rounds}),
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
