"""Run by test_py_spiffe.py in its own process: py-spiffe against our agent's socket.

Prints one `key=value` line per fact checked, or raises (non-zero exit) on any failure.
"""

import sys

from spiffe import JwtSource, WorkloadApiClient, X509Source

socket = sys.argv[1]
client = WorkloadApiClient(socket)
svid = client.fetch_x509_svid()
print(f"x509_svid={svid.spiffe_id}")
print(f"x509_key={type(svid.private_key).__name__}")
context = client.fetch_x509_context()
print(f"context_svids={len(context.x509_svids)}")
bundles = client.fetch_x509_bundles()
bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
print(f"x509_bundle_authorities={len(bundle.x509_authorities)}")
jwt = client.fetch_jwt_svid(audience={"payments", "audit"})
print(f"jwt_svid={jwt.spiffe_id}")
print(f"jwt_audience={','.join(sorted(jwt.audience))}")
validated = client.validate_jwt_svid(jwt.token, "audit")
print(f"jwt_validated={validated.spiffe_id}")
jwt_bundles = client.fetch_jwt_bundles()
jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
print(f"jwt_authorities={len(jwt_bundle.jwt_authorities)}")
with X509Source(socket_path=socket, timeout_in_seconds=20) as source:
    print(f"x509_source={source.svid.spiffe_id}")
with JwtSource(socket_path=socket, timeout_in_seconds=20) as jwt_source:
    print(f"jwt_source={jwt_source.fetch_svid(audience={'x'}).spiffe_id}")
client.close()
