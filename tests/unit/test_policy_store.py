"""Policy revisions on the server, through PolicyService over a real SQLite store: get, list,
apply (with the caller's words bounded) and roll back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.server_runtime import ADMIN, audit_events, server_runtime
from trustmesh.clip import AUTHOR, COMMENT, MARKER
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import InvalidArgumentError, NotFoundError

DOC = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  allow:
    - from: spiffe://example.org/{source}
"""


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    async with server_runtime(tmp_path) as rt:
        yield rt


async def apply(policy: PolicyService, source: str, **kw: str) -> int:
    revision, changed, _ = await policy.apply(DOC.format(source=source), author=kw.get("author", "alice"),
                                              comment=kw.get("comment", ""), expected_head=0, dry_run=False,
                                              actor=ADMIN)
    assert changed
    return revision


async def test_get_and_list_revisions(runtime: ServerRuntime) -> None:
    policy = PolicyService(runtime)
    with pytest.raises(NotFoundError, match="^no policy has been applied yet: everything is denied by default"):
        await policy.get()
    assert await policy.revisions() == []
    first = await apply(policy, "payments")
    second = await apply(policy, "billing")
    assert (await policy.get()).revision == second
    got = await policy.get(first)
    assert got.revision == first and "payments" in got.documents and got.author == "alice"
    assert [r.revision for r in await policy.revisions()] == [first, second]
    with pytest.raises(NotFoundError):
        await policy.get(99)


async def test_author_and_comment_are_bounded(runtime: ServerRuntime) -> None:
    policy = PolicyService(runtime)
    revision = await apply(policy, "payments", author="a" * 10_000, comment="c" * 10_000)
    stored = await policy.get(revision)
    assert stored.author == "a" * (AUTHOR - len(MARKER)) + MARKER
    assert stored.comment == "c" * (COMMENT - len(MARKER)) + MARKER
    [event] = await audit_events(runtime, "policy.apply")
    assert event.details["comment"] == stored.comment


async def test_rollback(runtime: ServerRuntime) -> None:
    policy = PolicyService(runtime)
    first = await apply(policy, "payments")
    await apply(policy, "billing")
    for bad in (0, -1):
        with pytest.raises(InvalidArgumentError, match="^name the revision to roll back to"):
            await policy.rollback(bad, author="", comment="", expected_head=0, actor=ADMIN)
    with pytest.raises(NotFoundError, match="there is no policy revision 42"):
        await policy.rollback(42, author="", comment="", expected_head=0, actor=ADMIN)
    back = await policy.rollback(first, author="", comment="", expected_head=0, actor=ADMIN)
    head = await policy.get()
    assert head.revision == back and "payments" in head.documents
    assert head.comment == f"rollback to revision {first}" and head.author == ADMIN
    assert [e.kind for e in await audit_events(runtime, "policy.rollback")] == ["policy.rollback"]


def large_allowlist(name: str, rules: int = 1000, path_chars: int = 560) -> str:
    """An allowlist of ~0.6 MB: two of them compile to more than MAX_COMPILED_POLICY_BYTES."""
    lines = "".join(f"    - from: spiffe://example.org/{i:04d}{'x' * path_chars}\n" for i in range(rules))
    return (f"apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {{name: {name}}}\nspec:\n"
            f"  destination: spiffe://example.org/{name}\n  allow:\n{lines}")


async def test_apply_refuses_what_no_node_could_receive(runtime: ServerRuntime) -> None:
    # Agents must never be the ones to discover that a policy is too large to send them.
    policy = PolicyService(runtime)
    first = await apply(policy, "payments")
    for documents, limit in ((large_allowlist("a") + "---\n" + large_allowlist("b"), "(MAX_COMPILED_POLICY_BYTES)"),
                             (DOC.format(source="x").replace("owner: payments", "owner: &a payments"),
                              "anchors (&a) are not allowed")):
        with pytest.raises(InvalidArgumentError, match=r"nothing was applied") as err:
            await policy.apply(documents, author="", comment="", expected_head=0, dry_run=False, actor=ADMIN)
        assert limit in str(err.value)
    assert (await policy.get()).revision == first
    assert [e.outcome for e in await audit_events(runtime, "policy.apply")] == ["ok", "denied", "denied"]


RESPONSE = """\
---
apiVersion: trustmesh/v1
kind: Response
metadata: {name: containment, owner: security}
spec:
  rules:
    - {identity: "*", detectors: [sweep], action: quarantine, above: 0.8}
"""


async def test_response_documents_are_no_teams(runtime: ServerRuntime) -> None:
    """What anomalies lead to is not a team's to change: a team apply carries allowlists only
    and keeps the Response documents in force; a policy-author scoped to a team cannot change
    them in a whole-policy apply either."""
    from tests.unit.test_policy_ownership import OWNERS, allowlist
    from trustmesh.errors import PermissionDeniedError

    policy = PolicyService(runtime)
    await policy.set_ownership(OWNERS, ADMIN)
    ledger = allowlist("ledger", "spiffe://example.org/ledger")
    await policy.apply(ledger + RESPONSE, author="a", comment="", expected_head=0, dry_run=False, actor=ADMIN)

    def common() -> dict[str, object]:
        return {"author": "pat", "comment": "", "expected_head": 0, "dry_run": False, "actor": "pat"}

    with pytest.raises(PermissionDeniedError, match="carries allowlists only"):
        await policy.apply(ledger.replace("web", "api") + RESPONSE, team="payments", **common())  # type: ignore[arg-type]
    with pytest.raises(PermissionDeniedError, match="may change only its allowlists; Response documents"):
        await policy.apply(ledger, scope="payments", **common())  # type: ignore[arg-type]
    # The team's own change keeps the responses in force.
    await policy.apply(ledger.replace("web", "api"), team="payments", scope="payments", **common())  # type: ignore[arg-type]
    head = PolicyService.parse_stored(await policy.head())
    assert [d.name for d in head.responses.documents] == ["containment"]
    assert [str(r.source) for a in head.allowlists for r in a.allow] == ["spiffe://example.org/api"]
