"""`trustmesh check`: is the mesh healthy? One line per check, in the manner of `linkerd check`.

Each check has a group, a name, a status (ok, warn or fail), a one-line detail and, unless it
passed, what to do. The facts come from the admin API (GetStatus, ListAgents, the policy, the
federation relationships, flows and access grants); the endpoints that partners and relying
parties use (the SPIFFE bundle endpoint, OIDC discovery) are fetched from here, over HTTPS,
as they would fetch them. Every rule about what passes is a pure function below, judged
against the server's clock (so a skewed client clock does not fail other checks than skew).

Exit status: 0 when no check failed (warnings are shown and do not fail, as in linkerd; with
--strict they do), 1 when one did, 2 when the check could not run (no server answered: that
is itself the first check, shown as a cross, and nothing else is checked).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from trustmesh.cli.admin_client import TIMEOUT, AdminCallError, add_socket_flag, call, print_json
from trustmesh.cli.config import invalid_as
from trustmesh.cli.policy_cmd import revision_policy
from trustmesh.clock import format_utc
from trustmesh.duration import parse_duration
from trustmesh.errors import TrustmeshError
from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.naming import server_dns_name
from trustmesh.spiffeid import TrustDomain

PASSED, FAILED, CANNOT_RUN = 0, 1, 2
Status = Literal["ok", "warn", "fail"]
T = TypeVar("T")

UNVERIFIED_WINDOW = 24 * 3600
# A replica rotates its signing CA at half its life; under a quarter left means it has not.
SIGNING_CA_MIN_LEFT = 0.25
# A federated bundle is refreshed every hint (clamped as the server does); three missed is stale.
FEDERATION_MISSED_REFRESHES = 3
DEFAULT_REFRESH, MIN_REFRESH, MAX_REFRESH = 300, 1, 3600
ENDPOINT_TIMEOUT = 5.0
MAX_BODY = 1 << 20
LISTED = 5  # names shown per check line; the rest are counted

GROUPS = ("control plane", "certificates", "agents", "endpoints", "posture")


@dataclass(frozen=True)
class Check:
    group: str
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Limits:
    """The operator's thresholds (seconds)."""

    ca_expiry_warning: float = timedelta(days=30).total_seconds()
    stale_after: float = 30.0
    skew_max: float = 5.0


def _ok(group: str, name: str, detail: str) -> Check:
    return Check(group, name, "ok", detail)


def _ago(seconds: float) -> str:
    """A duration in its two largest units, as people read it: 364d23h, 5m3s, 2s."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return "".join(p for p in parts if not p.startswith("0") or len(parts) == 1)


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return "; ".join(items[:LISTED]) + more


def _node_name(agent: types_pb2.AttestedNode) -> str:
    return agent.node_name or agent.spiffe_id


# --- control plane ------------------------------------------------------------------------------

def server_ready(status: admin_pb2.GetStatusResponse) -> Check:
    name = "server ready"
    if status.ready:
        return _ok("control plane", name, f"replica {status.replica_id} has loaded the registry and serves agents")
    return Check("control plane", name, "fail", f"replica {status.replica_id} is still loading the registry",
                 "wait a few seconds; if it stays so, read the server log (store errors, integrity failures)")


def clock_skew(server_time: float, sent: float, received: float, limits: Limits) -> Check:
    """The server's clock against this host's: it answered between `sent` and `received` (our
    clock), so any time in that window is consistent with no skew at all."""
    name = "clock skew"
    if sent <= server_time <= received:
        return _ok("control plane", name, f"within {received - sent:.2f}s of this host's clock "
                                         f"(max {limits.skew_max:g}s)")
    skew = server_time - received if server_time > received else server_time - sent
    words = f"the server's clock is {abs(skew):.1f}s {'ahead of' if skew > 0 else 'behind'} this host's"
    if abs(skew) <= limits.skew_max:
        return _ok("control plane", name, f"{words} (max {limits.skew_max:g}s)")
    return Check("control plane", name, "fail", f"{words}, more than --skew-max {limits.skew_max:g}s",
                 "run NTP (chrony, systemd-timesyncd) on the server and this host: certificates, one-time codes "
                 "and JWT-SVIDs are checked against the clock")


def leader_elected(status: admin_pb2.GetStatusResponse) -> Check:
    name = "leader elected"
    if not status.leader:
        return Check("control plane", name, "fail", "no replica holds the leader lease: root rotation and pruning "
                     "are not running", "check that the store answers (below) and the replicas' logs for "
                     "leader_campaign_unavailable")
    mine = " (this replica)" if status.leader == status.replica_id else ""
    return _ok("control plane", name, f"{status.leader}{mine}")


def store_healthy(status: admin_pb2.GetStatusResponse) -> Check:
    name = "store healthy"
    backend = status.store_backend
    if status.store_error:
        return Check("control plane", name, "fail", f"{backend} does not answer: {status.store_error}",
                     "check the store: the etcd cluster (`etcdctl endpoint health`) or the data directory's disk")
    members = list(status.store_members)
    if backend == "sqlite":
        where = members[0].endpoint if members else ""
        if members and not members[0].healthy:
            return Check("control plane", name, "fail", f"sqlite {where}: {members[0].error}",
                         "check the data directory's disk and permissions")
        return _ok("control plane", name, f"sqlite, embedded, one member ({where})")
    sick = [m for m in members if not m.healthy]
    leader = next((m.name for m in members if m.leader), "")
    summary = f"etcd, {len(members) - len(sick)} of {len(members)} member(s) healthy" + (
        f", leader {leader}" if leader else ", no leader")
    if not sick and leader:
        return _ok("control plane", name, f"{summary}: {', '.join(m.name for m in members)}")
    problems = _listed([f"{m.name} ({m.endpoint}): {m.error}" for m in sick])
    quorum = len(members) - len(sick) > len(members) // 2 and leader
    return Check("control plane", name, "warn" if quorum else "fail", f"{summary}; {problems}" if sick else summary,
                 "bring the member back (`etcdctl endpoint status --cluster`); "
                 + ("the cluster still has quorum" if quorum else "without quorum nothing can be written"))


# --- certificates -------------------------------------------------------------------------------

def _der(data: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _short(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()[:12]


def certificates_chain(status: admin_pb2.GetStatusResponse, bundle_roots: Sequence[bytes]) -> Check:
    """The replica's serving SVID -> its signing CA [-> the mesh root -> the upstream CAs, under
    an upstream authority] -> a root in the trust bundle, every link signed and valid at the
    server's time; and the active root is in the bundle or on that path."""
    name = "certificates chain"
    now = status.server_time_ms / 1000
    roots = [c for c in (_der(d) for d in bundle_roots) if c is not None]
    fix = "restart the replica so it renews its signing CA and SVID; if that does not help, compare " \
          "`trustmesh ca show` with `trustmesh bundle show`"
    active = next((a for a in status.authorities if a.kind == admin_pb2.CA_AUTHORITY_KIND_X509_ROOT
                   and a.state == admin_pb2.CA_AUTHORITY_STATE_ACTIVE), None)
    if active is None:
        return Check("certificates", name, "fail", "the CA journal has no active root", fix)
    chain = [c for c in (_der(d) for d in status.server_svid_chain) if c is not None]
    if len(chain) < 2:
        return Check("certificates", name, "fail", f"replica {status.replica_id} reports no serving SVID chain", fix)
    what = ["the server SVID", "its signing CA"] + [f"CA certificate {i}" for i in range(3, len(chain) + 1)]
    for cert, role in zip(chain, what, strict=False):
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            return Check("certificates", name, "fail", f"{role} is not valid now (valid "
                         f"{format_utc(cert.not_valid_before_utc)} to {format_utc(cert.not_valid_after_utc)})", fix)
    for index, (lower, upper) in enumerate(zip(chain, chain[1:], strict=False)):
        if not _issued_by(lower, upper):
            return Check("certificates", name, "fail", f"{what[index]} is not signed by the certificate the server "
                         "presents after it", fix)
    top = chain[-1]
    root = next((r for r in roots if r == top or _issued_by(top, r)), None)
    if root is None:
        return Check("certificates", name, "fail", "the signing CA chains to no root of the trust bundle: agents "
                     "and partners would refuse the server", fix)
    path_ders = [c.public_bytes(serialization.Encoding.DER) for c in chain[1:]]
    if active.certificate not in bundle_roots and active.certificate not in path_ders:
        return Check("certificates", name, "fail", "the active root is neither in the trust bundle nor on the "
                     "server's path to it", fix)
    der = root.public_bytes(serialization.Encoding.DER)
    root_id = next((a.key_id for a in status.authorities if a.certificate == der), _short(root))
    above = f" -> {len(chain) - 2} upstream CA certificate(s)" if len(chain) > 2 else ""
    return _ok("certificates", name, f"server SVID -> signing CA {_short(chain[1])}{above} -> root {root_id} "
                                     f"(in the bundle of {len(roots)} root(s))")


def root_expiry(status: admin_pb2.GetStatusResponse, limits: Limits) -> Check:
    name = "root CA expiry"
    now = status.server_time_ms / 1000
    roots = [a for a in status.authorities if a.kind == admin_pb2.CA_AUTHORITY_KIND_X509_ROOT]
    active = next((a for a in roots if a.state == admin_pb2.CA_AUTHORITY_STATE_ACTIVE), None)
    if active is None:
        return Check("certificates", name, "fail", "the CA journal has no active root",
                     "see `trustmesh ca show`; prepare and activate one with `trustmesh ca rotate`")
    left = active.not_after - now
    window = limits.ca_expiry_warning
    when = f"root {active.key_id} expires {format_utc(active.not_after)}"
    if left > window:
        return _ok("certificates", name, f"{when} (in {_ago(left)})")
    successor = next((a for a in roots if a.state == admin_pb2.CA_AUTHORITY_STATE_PREPARED
                      and a.not_after - now > window), None)
    if left > 0 and successor is not None:
        return Check("certificates", name, "warn", f"{when} (in {_ago(left)}); root {successor.key_id} is prepared "
                     "to take over", "the leader activates it on its schedule; to do it now: "
                     "`trustmesh ca rotate --step activate`")
    state = f"expired {_ago(-left)} ago" if left <= 0 else \
        f"in {_ago(left)}, within --ca-expiry-warning {_ago(window)}, and no successor is prepared"
    return Check("certificates", name, "fail", f"{when} ({state})",
                 "prepare and activate a new root: `trustmesh ca rotate --step prepare`, then `--step activate`; "
                 "check that a leader runs the rotation schedule (`trustmesh ca show`)")


def signing_ca_expiry(status: admin_pb2.GetStatusResponse) -> Check:
    """This replica's signing CA: rotated at half its life, so under a quarter left means the
    rotation is not happening. (Other replicas' are checked by asking them.)"""
    name = "signing CA expiry"
    now = status.server_time_ms / 1000
    mine = [a for a in status.authorities if a.kind == admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING
            and a.replica == status.replica_id and a.state == admin_pb2.CA_AUTHORITY_STATE_ACTIVE]
    if not mine:
        return Check("certificates", name, "fail", f"replica {status.replica_id} holds no signing CA",
                     "read the server log for signing CA errors; restart the replica")
    ca = max(mine, key=lambda a: a.not_after)
    life = max(ca.not_after - (ca.activated_at or ca.not_before), 1)
    left = ca.not_after - now
    when = f"replica {status.replica_id}'s signing CA expires {format_utc(ca.not_after)}"
    if left > life * SIGNING_CA_MIN_LEFT:
        return _ok("certificates", name, f"{when} (in {_ago(left)} of {_ago(life)}; renewed at half-life)")
    state = f"expired {_ago(-left)} ago" if left <= 0 else \
        f"in {_ago(left)}, under a quarter of its {_ago(life)} life: it should have been renewed at half-life"
    return Check("certificates", name, "fail", f"{when} ({state})",
                 "read the server log for rotation_deferred (the store did not answer) or signing CA errors; "
                 "restart the replica to renew it")


# --- agents ---------------------------------------------------------------------------------------

def agents_connected(agents: Sequence[types_pb2.AttestedNode], status: admin_pb2.GetStatusResponse,
                     limits: Limits) -> Check:
    """Every agent (but banned ones) holds a sync stream to this replica. One that lost it
    within --stale-after is a warning (reconnecting?), longer is a failure. With etcd (several
    replicas) an agent may stream to another replica: one whose SVID renewals are on time is
    then only a warning."""
    name = "agents connected"
    now = status.server_time_ms / 1000
    seen = {p.spiffe_id: p.last_seen for p in status.agents}
    live = [a for a in agents if not a.banned]
    banned = len(agents) - len(live)
    note = f" ({banned} banned, not counted)" if banned else ""
    if not live:
        return _ok("agents", name, f"no agent has attested yet{note}")
    stale: list[str] = []
    recent: list[str] = []
    elsewhere: list[str] = []
    for agent in sorted(live, key=_node_name):
        if agent.connected:
            continue
        last = seen.get(agent.spiffe_id) or agent.updated_at
        age = now - last
        line = f"{_node_name(agent)} last seen {format_utc(last)} " + (
            f"(stale {_ago(age)})" if age > limits.stale_after else f"({_ago(age)} ago)")
        renewal_due = agent.updated_at + max(status.agent_ttl_seconds, 1) / 2 + limits.stale_after
        if status.store_backend != "sqlite" and not seen.get(agent.spiffe_id) and now <= renewal_due:
            elsewhere.append(f"{_node_name(agent)} (SVID renewed {format_utc(agent.updated_at)})")
        elif age > limits.stale_after:
            stale.append(line)
        else:
            recent.append(line)
    connected = len(live) - len(stale) - len(recent) - len(elsewhere)
    counts = f"{connected} of {len(live)} connected to replica {status.replica_id}{note}"
    if stale:
        return Check("agents", name, "fail", f"{_listed(stale + recent)} — {counts}",
                     "start the agent again on that node (`systemctl start trustmesh-agent`, or `trustmesh agent "
                     "run`) and read its log; a node that is gone for good: `trustmesh agent evict NODE`")
    if recent:
        return Check("agents", name, "warn", f"{_listed(recent)}, within --stale-after {_ago(limits.stale_after)}: "
                     f"reconnecting? — {counts}", "run the check again in a minute; read the agent's log if it "
                     "stays so")
    if elsewhere:
        return Check("agents", name, "warn", f"not streaming to this replica: {_listed(elsewhere)} — {counts}",
                     "probably connected to another replica (renewals on time): run `trustmesh check` against "
                     "each replica to be sure")
    return _ok("agents", name, counts)


def policy_converged(agents: Sequence[types_pb2.AttestedNode], head: int) -> Check:
    name = "policy converged"
    connected = [a for a in agents if a.connected and not a.banned]
    if not connected:
        return _ok("agents", name, f"revision {head} in force; no agent is connected here to compare"
                   if head else "no policy applied yet (default deny)")
    behind = [f"{_node_name(a)} enforces revision {a.policy_revision}" for a in sorted(connected, key=_node_name)
              if a.policy_revision != head]
    if behind:
        return Check("agents", name, "fail", f"{_listed(behind)}; revision {head} is in force",
                     "the server pushes every revision on the sync stream at once: read that agent's log for "
                     "sync errors, then restart it")
    what = f"revision {head}" if head else "no policy yet (default deny)"
    return _ok("agents", name, f"all {len(connected)} connected agent(s) enforce {what}")


# --- endpoints ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    """What an HTTPS GET came back with: a status and body, or why it failed."""

    status: int = 0
    content_type: str = ""
    body: bytes = b""
    error: str = ""


def _https_get(address: str, path: str, context: ssl.SSLContext, server_name: str, host_header: str) -> Fetched:
    try:
        host, port = split_host_port(address)
        with socket.create_connection((host, port), ENDPOINT_TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n"
                        "Connection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            return Fetched(response.status, response.getheader("Content-Type", "") or "", response.read(MAX_BODY))
    except ssl.SSLCertVerificationError as err:
        return Fetched(error=f"its certificate is not trusted: {err.verify_message}")
    except (OSError, ValueError, http.client.HTTPException) as err:
        return Fetched(error=str(err) or type(err).__name__)


def _json_object(fetched: Fetched) -> dict[str, object] | None:
    try:
        data = json.loads(fetched.body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _roots_context(roots: Sequence[bytes]) -> ssl.SSLContext:
    pem = "".join(x509.load_der_x509_certificate(r).public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    return ssl.create_default_context(cadata=pem)


def bundle_endpoint(status: admin_pb2.GetStatusResponse, fetched: Fetched | None, address: str) -> Check:
    name = "bundle endpoint reachable"
    if fetched is None:
        return _ok("endpoints", name, "not configured (no --bundle-endpoint)")
    url = f"https://{address}/"
    fix = "check --bundle-endpoint and the server log; partners fetch the bundle from here"
    if fetched.error:
        return Check("endpoints", name, "fail", f"{url}: {fetched.error}", fix)
    doc = _json_object(fetched)
    if fetched.status != 200 or doc is None or "keys" not in doc:
        return Check("endpoints", name, "fail", f"{url} answered {fetched.status} without a SPIFFE bundle", fix)
    keys = doc.get("keys")
    count = len(keys) if isinstance(keys, list) else 0
    return _ok("endpoints", name, f"{url} ({status.bundle_endpoint_profile}; {count} key(s))")


def oidc_endpoint(status: admin_pb2.GetStatusResponse, fetched: Fetched | None, url: str) -> Check:
    name = "OIDC discovery reachable"
    if fetched is None:
        return _ok("endpoints", name, "not configured (no --oidc-discovery-bind)")
    fix = "check --oidc-discovery-bind and --oidc-issuer and the server log; relying parties (cloud IAM, Vault) " \
          "start from this document"
    if fetched.error:
        return Check("endpoints", name, "fail", f"{url}: {fetched.error}", fix)
    doc = _json_object(fetched)
    if fetched.status != 200 or doc is None:
        return Check("endpoints", name, "fail", f"{url} answered {fetched.status} without a JSON document", fix)
    if doc.get("issuer") != status.oidc_issuer:
        return Check("endpoints", name, "fail", f"{url} names issuer {str(doc.get('issuer'))[:100]!r}, not "
                     f"--oidc-issuer {status.oidc_issuer!r}: relying parties will refuse every JWT-SVID", fix)
    return _ok("endpoints", name, f"{url} (issuer {status.oidc_issuer})")


def federation_fresh(relationships: Sequence[admin_pb2.FederationRelationship], hints: dict[str, int],
                     now: float) -> Check:
    """Every relationship with an endpoint was refreshed within three refresh hints and its
    last refresh succeeded; `hints`: trust domain -> its bundle's refresh hint (seconds)."""
    name = "federation relationships fresh"
    fetched = [r for r in relationships if r.bundle_endpoint_url]
    if not fetched:
        static = len(relationships)
        return _ok("endpoints", name, f"{static} relationship(s), none fetched from an endpoint" if static
                   else "no federation relationships")
    problems: list[str] = []
    for r in sorted(fetched, key=lambda r: r.trust_domain):
        every = max(MIN_REFRESH, min(MAX_REFRESH, hints.get(r.trust_domain) or DEFAULT_REFRESH))
        if r.last_error:
            problems.append(f"{r.trust_domain}: last refresh failed: {r.last_error[:200]}")
        elif not r.last_refreshed_at:
            problems.append(f"{r.trust_domain}: never fetched from {r.bundle_endpoint_url}")
        elif now - r.last_refreshed_at > FEDERATION_MISSED_REFRESHES * every:
            problems.append(f"{r.trust_domain}: last refreshed {format_utc(r.last_refreshed_at)} "
                            f"({_ago(now - r.last_refreshed_at)} ago; due every {_ago(every)})")
    if problems:
        return Check("endpoints", name, "fail", _listed(problems),
                     "check the partner's endpoint from the server host, then `trustmesh federation refresh TD`")
    return _ok("endpoints", name, f"{len(fetched)} relationship(s) refreshed on time")


# --- posture --------------------------------------------------------------------------------------

def permissive_listeners(agents: Sequence[types_pb2.AttestedNode]) -> Check:
    name = "no permissive listeners"
    open_ = [f"{_node_name(a)}: {listener}" for a in sorted(agents, key=_node_name) for listener in
             a.permissive_listeners]
    if not open_:
        return _ok("posture", name, "every inbound listener requires mTLS")
    return Check("posture", name, "fail", f"forwarding plaintext without an identity: {_listed(open_)}",
                 "find the callers (`trustmesh flows --decision unverified`), give them identities, then set "
                 "mtls: strict")


def unverified_callers(edges: Sequence[admin_pb2.FlowEdge] | None, refusal: str = "") -> Check:
    name = "no unverified callers"
    if edges is None:
        return Check("posture", name, "warn", f"not checked: {refusal}", "ask for a role that may list flows")
    callers: dict[str, set[str]] = {}
    for edge in edges:
        callers.setdefault(edge.destination, set()).add(edge.source_address)
    if not callers:
        return _ok("posture", name, "no plaintext caller in the last 24 h")
    seen = [f"{d} from {', '.join(sorted(a)[:3])}{' …' if len(a) > 3 else ''}" for d, a in sorted(callers.items())]
    return Check("posture", name, "warn", f"plaintext callers in the last 24 h: {_listed(seen)}",
                 "give these callers identities before the listener goes strict")


def audit_mode(revision: admin_pb2.PolicyRevision | None, refusal: str = "") -> Check:
    name = "allowlists enforce"
    if refusal:
        return Check("posture", name, "warn", f"not checked: {refusal}", "ask for a role that may read the policy")
    auditing = [f"{a.name} ({a.destination})" for a in revision_policy(revision).allowlists
                if a.mode == "audit"] if revision is not None else []
    if not auditing:
        return _ok("posture", name, "no allowlist in audit mode")
    return Check("posture", name, "warn", f"in audit mode, denying nothing: {_listed(auditing)}",
                 "watch `trustmesh flows --decision audit`, then set mode: enforce (check first with "
                 "`trustmesh policy simulate`)")


def suspected_clones(agents: Sequence[types_pb2.AttestedNode]) -> Check:
    name = "no suspected clones"
    marked = [f"{_node_name(a)}: {a.status_reason}" for a in sorted(agents, key=_node_name)
              if a.status == types_pb2.AGENT_STATUS_SUSPECTED_CLONE and not a.banned]
    if not marked:
        return _ok("posture", name, "no agent identity was seen in two places")
    return Check("posture", name, "fail", _listed(marked),
                 "ban it (`trustmesh agent ban NODE`) or, once the node is checked, `trustmesh agent clear NODE`")


def break_glass(grants: Sequence[admin_pb2.AccessGrant] | None, refusal: str = "") -> Check:
    name = "break-glass reviewed"
    if grants is None:
        return Check("posture", name, "warn", f"not checked: {refusal}", "ask for a role that may list access")
    if not grants:
        return _ok("posture", name, "no break-glass access awaiting review")
    return Check("posture", name, "fail", _listed([f"{g.id} by {g.requester}" for g in grants]),
                 "review each: `trustmesh access review ID --otp CODE` (by someone other than its requester)")


# --- gathering ----------------------------------------------------------------------------------

class _CannotRun(Exception):
    """The server answered but the checks cannot start (GetStatus refused): this is the one check."""

    def __init__(self, check: Check) -> None:
        super().__init__(check.detail)
        self.check = check


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _may(invoke: Callable[[], T]) -> T:
    """One read; a refusal by role becomes _Refused (that check is skipped, with the reason)."""
    try:
        return invoke()
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.PERMISSION_DENIED:
            raise _Refused(err.details() or "permission denied") from None
        raise


def _dial_address(address: str) -> str:
    host, port = split_host_port(address, listening=True)
    return join_host_port({"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)


def _endpoints(status: admin_pb2.GetStatusResponse, roots: Sequence[bytes]) -> list[Check]:
    listeners = {listener.name: listener.address for listener in status.listeners}
    td = TrustDomain(status.trust_domain)
    bundle_at = listeners.get("bundle_endpoint", "")
    fetched: Fetched | None = None
    if bundle_at:
        if status.bundle_endpoint_profile == "https_web":
            # A web-PKI certificate, for its public name: check it as a partner would, with
            # this host's CAs; a loopback dial cannot match that name, so only the chain counts.
            context = ssl.create_default_context()
            context.check_hostname = False
            fetched = _https_get(bundle_at, "/", context, split_host_port(bundle_at)[0], bundle_at)
        else:
            fetched = _https_get(bundle_at, "/", _roots_context(roots), server_dns_name(td), bundle_at)
    checks = [bundle_endpoint(status, fetched, bundle_at)]
    oidc: Fetched | None = None
    url = ""
    if status.oidc_discovery_bind:
        issuer = status.oidc_issuer.rstrip("/")
        path = (issuer.split("://", 1)[-1].partition("/")[2])
        well_known = f"/{path}/.well-known/openid-configuration" if path else "/.well-known/openid-configuration"
        if status.oidc_serves_server_svid:
            at = listeners.get("oidc_discovery") or _dial_address(status.oidc_discovery_bind)
            url = f"https://{at}{well_known}"
            oidc = _https_get(at, well_known, _roots_context(roots), server_dns_name(td), at)
        else:
            # Its own certificate for the issuer's name: fetch it where relying parties do.
            host = issuer.split("://", 1)[-1].partition("/")[0]
            url = f"https://{host}{well_known}"
            address = host if split_host_port(host)[1] else join_host_port(host, 443)
            oidc = _https_get(address, well_known, ssl.create_default_context(), split_host_port(host)[0], host)
    checks.append(oidc_endpoint(status, oidc, url))
    return checks


def _unreachable(why: str) -> Check:
    return Check("control plane", "server reachable", "fail", why,
                 "start it (`trustmesh server run`), or name it: --admin-socket PATH (or $TRUSTMESH_ADMIN_SOCKET), "
                 "--admin-server HOST:PORT with an admin SVID, or `trustmesh login`")


def run_checks(stub: admin_pb2_grpc.AdminStub, limits: Limits) -> list[Check]:
    """Every check, in order; raises grpc.RpcError when GetStatus itself is refused or fails."""
    sent = time.time()
    try:
        status: admin_pb2.GetStatusResponse = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
        raise _CannotRun(Check("control plane", "server reachable", "fail",
                               f"the server answered but refused the status call: {err.details()} ({err.code().name})",
                               "check with a role that may list (viewer or above), against a server of this "
                               "version")) from None
    received = time.time()
    now = status.server_time_ms / 1000
    checks = [_ok("control plane", "server reachable", f"replica {status.replica_id} of {status.trust_domain} "
                  f"answered in {received - sent:.2f}s"),
              server_ready(status), clock_skew(now, sent, received, limits), leader_elected(status),
              store_healthy(status)]
    bundle = stub.GetBundle(admin_pb2.GetBundleRequest(), timeout=TIMEOUT).bundle
    roots = list(bundle.x509_authorities)
    checks += [certificates_chain(status, roots), root_expiry(status, limits), signing_ca_expiry(status)]
    agents = list(stub.ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT).agents)
    checks += [agents_connected(agents, status, limits), policy_converged(agents, status.policy_revision)]
    checks += _endpoints(status, roots)
    relationships = list(stub.ListFederationRelationships(admin_pb2.ListFederationRelationshipsRequest(),
                                                          timeout=TIMEOUT).relationships)
    hints: dict[str, int] = {}
    for r in relationships:
        try:
            hints[r.trust_domain] = stub.GetBundle(admin_pb2.GetBundleRequest(trust_domain=r.trust_domain),
                                                   timeout=TIMEOUT).bundle.refresh_hint_seconds
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
    checks.append(federation_fresh(relationships, hints, now))
    checks += [permissive_listeners(agents), suspected_clones(agents)]
    try:
        edges = _may(lambda: list(stub.ListFlows(admin_pb2.ListFlowsRequest(
            since=int(now) - UNVERIFIED_WINDOW, decision="unverified"), timeout=TIMEOUT).edges))
        checks.append(unverified_callers(edges))
    except _Refused as refused:
        checks.append(unverified_callers(None, refused.message))
    try:
        checks.append(audit_mode(_may(lambda: _policy_or_none(stub))))
    except _Refused as refused:
        checks.append(audit_mode(None, refused.message))
    try:
        grants = _may(lambda: list(stub.ListAccess(admin_pb2.ListAccessRequest(state="review"),
                                                   timeout=TIMEOUT).grants))
        checks.append(break_glass(grants))
    except _Refused as refused:
        checks.append(break_glass(None, refused.message))
    return checks


def _policy_or_none(stub: admin_pb2_grpc.AdminStub) -> admin_pb2.PolicyRevision | None:
    """The policy in force; None before any was applied."""
    try:
        reply: admin_pb2.GetPolicyResponse = stub.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=TIMEOUT)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return reply.policy


# --- output -------------------------------------------------------------------------------------

_MARKS = {"ok": "√", "warn": "‼", "fail": "×"}
_ASCII_MARKS = {"ok": "[ok]", "warn": "[warn]", "fail": "[FAIL]"}


def marks_for(encoding: str | None) -> dict[str, str]:
    """linkerd's marks where the terminal can show them, plain ASCII where it cannot."""
    try:
        "".join(_MARKS.values()).encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return _ASCII_MARKS
    return _MARKS


def render(checks: Iterable[Check], marks: dict[str, str]) -> str:
    lines: list[str] = []
    checks = list(checks)
    for group in [g for g in GROUPS if any(c.group == g for c in checks)]:
        if lines:
            lines.append("")
        lines += [group, "-" * len(group)]
        for c in (c for c in checks if c.group == group):
            lines.append(f"{marks[c.status]} {c.name}: {c.detail}")
            if c.status != "ok" and c.fix:
                lines.append(f"    fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append("")
    if failed:
        lines.append(f"{marks['fail']} {failed} of {len(checks)} check(s) failed"
                     + (f", {warned} warning(s)" if warned else ""))
    else:
        lines.append(f"{marks['ok']} all {len(checks)} checks passed" + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join(lines)


def exit_code(checks: Iterable[Check], strict: bool = False) -> int:
    failing = {"fail", "warn"} if strict else {"fail"}
    return FAILED if any(c.status in failing for c in checks) else PASSED


def _limits(args: argparse.Namespace) -> Limits:
    def seconds(flag: str, text: str) -> float:
        try:
            return parse_duration(text).total_seconds()
        except ValueError as err:
            raise TrustmeshError(f"{flag} {text!r}: {err}") from err
    return Limits(ca_expiry_warning=seconds("--ca-expiry-warning", args.ca_expiry_warning),
                  stale_after=seconds("--stale-after", args.stale_after),
                  skew_max=seconds("--skew-max", args.skew_max))


def _print(checks: list[Check], as_json: bool) -> None:
    if as_json:
        print_json([asdict(c) for c in checks])
    else:
        print(render(checks, marks_for(sys.stdout.encoding)))


def _check(args: argparse.Namespace) -> int:
    limits = _limits(args)
    try:
        checks = call(args, lambda stub: run_checks(stub, limits))
    except AdminCallError as err:
        # Nothing else can be checked without a server: the first check fails, and we stop.
        _print([_unreachable(str(err))], args.json)
        return CANNOT_RUN
    except _CannotRun as cannot:
        _print([cannot.check], args.json)
        return CANNOT_RUN
    _print(checks, args.json)
    return exit_code(checks, args.strict)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "check", help="is the mesh healthy? one line per check, with what to do",
        description="Check the control plane and the mesh, in the manner of `linkerd check`: the server answers "
                    "and is ready, clocks agree, a leader is elected, the store and its members are healthy, the "
                    "certificates chain to the bundle, the root and signing CA are not near expiry, every agent is "
                    "connected and enforces the policy in force, the bundle and OIDC discovery endpoints answer, "
                    "federated bundles are fresh; and the posture: no permissive listener, no unverified caller, "
                    "no allowlist in audit mode, no suspected clone, no unreviewed break-glass access. Each line "
                    "is a tick, a warning or a cross, with what to do. Exit 0 when no check failed (warnings do "
                    "not fail, unless --strict), 1 when one did, 2 when the check could not run (no server).",
        epilog="examples:\n  trustmesh check\n  trustmesh check --json                 # in a CI job or a cron alert"
               "\n  trustmesh check --stale-after 5m --ca-expiry-warning 60d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true",
                   help="print the checks as a JSON array of {group, name, status, detail, fix}")
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    p.add_argument("--ca-expiry-warning", metavar="DURATION", default="30d",
                   help="fail when the active root expires within this and no successor is prepared (default 30d; "
                        "signing CAs fail under a quarter of their life left, as they renew at half)")
    p.add_argument("--stale-after", metavar="DURATION", default="30s",
                   help="an agent disconnected from the server longer than this fails; sooner it is a warning "
                        "(reconnecting?) (default 30s)")
    p.add_argument("--skew-max", metavar="DURATION", default="5s",
                   help="the most the server's clock may differ from this host's (default 5s)")
    add_socket_flag(p)
    p.set_defaults(func=invalid_as(CANNOT_RUN, _check))
