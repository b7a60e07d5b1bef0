"""Run by test_workload_api_clients.py in its own process: py-spiffe, an independent SPIFFE
client with its own copy of the standard proto, against our Workload API server.

It finds the server through SPIFFE_ENDPOINT_SOCKET, as any workload would. It prints one
JSON object per line for each step and takes its cue for the next step from stdin
("rotated", "deleted"), so the test can change the server's state in between.
"""

import json
import sys
import threading

from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe.workloadapi.workload_api_client import RetryPolicy

WAIT = 30.0


def say(step: str, **facts: object) -> None:
    print(json.dumps({"step": step, **facts}), flush=True)


def cue(expected: str) -> None:
    line = sys.stdin.readline().strip()
    if line != expected:
        raise SystemExit(f"expected the cue {expected!r}, got {line!r}")


partner_token = sys.argv[1]
client = WorkloadApiClient()  # SPIFFE_ENDPOINT_SOCKET

# One-shot calls.
svid = client.fetch_x509_svid()
context = client.fetch_x509_context()
bundles = client.fetch_x509_bundles()
jwt = client.fetch_jwt_svid(audience={"payments", "audit"})
only = client.fetch_jwt_svid(audience={"x"}, subject=SpiffeId("spiffe://example.org/ledger"))
validated = client.validate_jwt_svid(jwt.token, "audit")
partner = client.validate_jwt_svid(partner_token, "ledger")
jwt_bundles = client.fetch_jwt_bundles()
say("facts",
    x509_svid=str(svid.spiffe_id),
    x509_key=type(svid.private_key).__name__,
    x509_chain=len(svid.cert_chain),
    context_svids=sorted(str(s.spiffe_id) for s in context.x509_svids),
    context_bundles=sorted(str(b.trust_domain) for b in context.x509_bundle_set.bundles),
    x509_bundles=sorted(str(b.trust_domain) for b in bundles.bundles),
    jwt_svid=str(jwt.spiffe_id),
    jwt_audience=sorted(jwt.audience),
    jwt_only=str(only.spiffe_id),
    validated=str(validated.spiffe_id),
    partner=str(partner.spiffe_id),
    jwt_kids={str(b.trust_domain): sorted(b.jwt_authorities) for b in jwt_bundles.bundles})

# The X509Source keeps a stream open and must see a rotation without reconnecting.
updated = threading.Event()
with X509Source(timeout_in_seconds=WAIT) as source:
    first = source.svid.leaf.serial_number
    source.subscribe_for_updates(updated.set)
    say("source", serial=first)
    cue("rotated")
    while source.svid.leaf.serial_number == first:
        if not updated.wait(WAIT):
            raise SystemExit("the X509Source saw no rotation")
        updated.clear()
    say("rotated", serial=source.svid.leaf.serial_number)

with JwtSource(timeout_in_seconds=WAIT) as jwt_source:
    td_bundle = jwt_source.get_bundle_for_trust_domain(TrustDomain("example.org"))
    say("jwt_source", kids=sorted(td_bundle.jwt_authorities) if td_bundle else [])

# A watcher is told when its identity is withdrawn (PermissionDenied) rather than seeing
# the stream end cleanly.
errors: list[str] = []
seen = threading.Event()
failed = threading.Event()


def on_error(err: Exception) -> None:
    errors.append(str(err))
    failed.set()


handle = client.stream_x509_contexts(on_success=lambda _ctx: seen.set(), on_error=on_error,
                                     retry_policy=RetryPolicy(max_retries=1, base_backoff_in_seconds=0.05))
if not seen.wait(WAIT):
    raise SystemExit("the watcher got no first context")
say("watching")
cue("deleted")
if not failed.wait(WAIT):
    raise SystemExit("the watcher was not told that its identity was withdrawn")
say("denied", error=errors[0])
handle.cancel()
client.close()
