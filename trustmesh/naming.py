"""Reserved names in a trust domain, shared by the control plane and the agent.

- ``spiffe://<td>/trustmesh/server``: the control plane's own serving identity;
- ``spiffe://<td>/agent/<node>``: a node agent, named at join-token creation;
- ``trustmesh-server.<td>``: the DNS name agents verify the server's certificate for.
  gRPC clients in Python cannot check a SPIFFE ID during the handshake, so the agent pins
  this name (via ssl_target_name_override) and the server refuses to register any entry
  that would make the CA issue it, or any ID under the reserved paths, to a workload.
"""

from __future__ import annotations

import re

from trustmesh.spiffeid import SpiffeId, TrustDomain

AGENT_PATH_PREFIX = "/agent/"
# Operators (people, controlplane/operators.py) are named under /operator: no entry may mint their IDs.
RESERVED_PATH_PREFIXES = ("/agent", "/trustmesh", "/operator")


def server_id(td: TrustDomain) -> SpiffeId:
    return SpiffeId.from_parts(td, "trustmesh", "server")


def server_dns_name(td: TrustDomain) -> str:
    return f"trustmesh-server.{td.name}"


def agent_id(td: TrustDomain, node_name: str) -> SpiffeId:
    return SpiffeId.from_parts(td, "agent", node_name)


def node_name_of(agent: SpiffeId) -> str | None:
    """The node name of an agent ID, or None when the ID is not an agent's."""
    if agent.path.startswith(AGENT_PATH_PREFIX) and agent.path.count("/") == 2:
        return agent.path[len(AGENT_PATH_PREFIX):]
    return None


def is_reserved(spiffe_id: SpiffeId) -> bool:
    """True for IDs only trustmesh itself may hold (agents, the server, operators)."""
    return any(spiffe_id.path == p or spiffe_id.path.startswith(p + "/") for p in RESERVED_PATH_PREFIXES)


# The roles an operator may hold (controlplane/api/calls.py says what each may call).
OPERATOR_ROLES = ("admin", "security-officer", "policy-author", "auditor", "viewer")
# The request metadata that carries an operator's one-time code for step-up calls.
OTP_HEADER = "x-trustmesh-otp"
# Operator and team names: a-z, 0-9 and '-', starting with a letter, at most 63 characters.
NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
