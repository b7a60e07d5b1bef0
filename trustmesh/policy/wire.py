"""Compiled policy on the wire (types.proto CompiledPolicy), both ways.

The server compiles what a node needs and the agent rebuilds the same `Policy` from it, so
both sides decide with the one function in model.py.

MAX_COMPILED_POLICY_BYTES bounds what any node can be sent, well under gRPC's 4 MiB
message limit (which also carries the node's entries and bundles): the server refuses a
revision above it at apply, so no agent ever finds out by failing to receive an update.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.policy.model import Allowlist, AllowRule, IdPattern, Mode, Policy, PolicyError
from trustmesh.policy.routes import PathPattern, check_method
from trustmesh.policy.windows import TimeWindow

MAX_COMPILED_POLICY_BYTES = 1024 * 1024
# What an agent says it enforces (SyncRequest.features): allow rules with methods and paths.
# The server sends route rules only to agents that say so.
HTTP_ROUTES = "http_routes"
# ... and allow rules with time windows (`when`): rules with windows go only to agents that say so.
TIME_WINDOWS = "time_windows"

_MODES = {"enforce": types_pb2.POLICY_MODE_ENFORCE, "audit": types_pb2.POLICY_MODE_AUDIT}


def _id_text(pattern: IdPattern) -> str:
    # On the wire a prefix travels without its "/*", flagged by is_prefix.
    return f"spiffe://{pattern.trust_domain.name}{pattern.path}"


def _pattern(text: str, is_prefix: bool) -> IdPattern:
    return IdPattern.parse(text + "/*" if is_prefix else text)


@functools.lru_cache(maxsize=4)
def _in_order(ids: frozenset[str]) -> tuple[str, ...]:
    # The same quarantine goes to every agent a wake-up reaches: sorted once, not once per agent.
    return tuple(sorted(ids))


def policy_to_pb(policy: Policy) -> types_pb2.CompiledPolicy:
    rules = []
    for allowlist in policy.allowlists:
        rules.append(types_pb2.PolicyRule(
            destination=_id_text(allowlist.destination), destination_is_prefix=allowlist.destination.is_prefix,
            ports=list(allowlist.ports), mode=_MODES[allowlist.mode], allowlist=allowlist.name,
            owner=allowlist.owner,
            allow=[types_pb2.AllowedSource(id=_id_text(r.source), is_prefix=r.source.is_prefix,
                                           expires_at=int(r.expires.timestamp()) if r.expires else 0,
                                           methods=r.methods, paths=[str(p) for p in r.paths],
                                           windows=[types_pb2.TimeWindow(days=w.days, start_minute=w.start,
                                                                         end_minute=w.end,
                                                                         timezone=w.timezone)
                                                    for w in r.windows])
                   for r in allowlist.allow],
        ))
    return types_pb2.CompiledPolicy(revision=policy.revision, rules=rules,
                                    revoked_serials=sorted(policy.revoked_serials),
                                    quarantined=_in_order(policy.quarantined))


def compiled_size_problem(policy: Policy) -> str | None:
    """Why `policy` is too large to send, or None. A node is sent a subset of the whole
    compiled policy, so bounding the whole bounds every node, whatever entries it gets later."""
    size = policy_to_pb(policy).ByteSize()
    if size <= MAX_COMPILED_POLICY_BYTES:
        return None
    return (f"the compiled policy is {size} bytes, above the limit of {MAX_COMPILED_POLICY_BYTES} bytes "
            "(MAX_COMPILED_POLICY_BYTES) that a node may be sent; split rules by prefix/* or remove some")


def _allow_rule(allowlist: str, index: int, item: types_pb2.AllowedSource) -> AllowRule:
    # A route this agent cannot read refuses the whole policy, never a guess: dropping the
    # route would widen the rule to every request and connection.
    try:
        methods = tuple(check_method(m) for m in item.methods)
        paths = tuple(PathPattern.parse(p) for p in item.paths)
    except PolicyError as err:
        raise PolicyError(f"compiled policy: {allowlist} allow[{index}] has a route this agent cannot use: {err}; "
                          "is the server newer than this agent?") from err
    # Likewise a window this agent cannot evaluate (a zone missing from its tz database)
    # refuses the policy: dropping it would allow at every time.
    try:
        windows = tuple(TimeWindow(w.days, w.start_minute, w.end_minute, w.timezone) for w in item.windows)
    except PolicyError as err:
        raise PolicyError(f"compiled policy: {allowlist} allow[{index}] has a time window this agent cannot use: "
                          f"{err}; install tzdata on this node or update it") from err
    expires = datetime.fromtimestamp(item.expires_at, timezone.utc) if item.expires_at else None
    return AllowRule(_pattern(item.id, item.is_prefix), expires, methods, paths, windows)


def policy_from_pb(message: types_pb2.CompiledPolicy) -> Policy:
    """The policy of a compiled message; PolicyError when a rule in it cannot be read."""
    allowlists = []
    for rule in message.rules:
        mode: Mode = "audit" if rule.mode == types_pb2.POLICY_MODE_AUDIT else "enforce"
        allowlists.append(Allowlist(
            name=rule.allowlist, owner=rule.owner, mode=mode, ports=tuple(rule.ports),
            destination=_pattern(rule.destination, rule.destination_is_prefix),
            allow=tuple(_allow_rule(rule.allowlist, i, a) for i, a in enumerate(rule.allow)),
        ))
    return Policy(tuple(allowlists), message.revision, frozenset(message.revoked_serials),
                  quarantined=frozenset(message.quarantined))
