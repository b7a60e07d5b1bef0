"""Team-owned allowlists: the ownership file's parser (property-tested), documents rendered
from allowlists that load back to the same allowlists, and team-scoped applies through
PolicyService over a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.server_runtime import ADMIN, audit_events, server_runtime
from trustmesh.controlplane.policy_store import PolicyService
from trustmesh.errors import InvalidArgumentError, PermissionDeniedError
from trustmesh.policy import load_text
from trustmesh.policy.loader import dump_documents
from trustmesh.policy.model import Allowlist, AllowRule, IdPattern, PolicyError
from trustmesh.policy.ownership import covers, parse_ownership
from trustmesh.spiffeid import SpiffeId

OWNERS = """\
apiVersion: trustmesh/v1
kind: Ownership
teams:
  payments: [spiffe://example.org/ledger, spiffe://example.org/payments/*]
  risk: [spiffe://example.org/fraud/*, spiffe://example.org/payments/fraud-check]
  platform: [spiffe://example.org/*]
"""


def allowlist(name: str, destination: str, source: str = "spiffe://example.org/web") -> str:
    return (f"---\napiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {{name: {name}}}\n"
            f"spec:\n  destination: {destination}\n  allow:\n    - from: {source}\n")


# --- the ownership file ---------------------------------------------------------------------


def test_the_most_specific_pattern_wins() -> None:
    owners = parse_ownership(OWNERS)
    team = {d: owners.team_of(IdPattern.parse(d)) for d in (
        "spiffe://example.org/ledger", "spiffe://example.org/ledger/replica", "spiffe://example.org/payments/api",
        "spiffe://example.org/payments/*", "spiffe://example.org/payments/fraud-check", "spiffe://example.org/fraud/x",
        "spiffe://example.org/*", "spiffe://other.org/ledger")}
    assert team == {
        "spiffe://example.org/ledger": "payments",
        "spiffe://example.org/ledger/replica": "platform",  # an exact ID does not own what lies below it
        "spiffe://example.org/payments/api": "payments",
        "spiffe://example.org/payments/*": "payments",
        "spiffe://example.org/payments/fraud-check": "risk",
        "spiffe://example.org/fraud/x": "risk",
        "spiffe://example.org/*": "platform",
        "spiffe://other.org/ledger": None,
    }
    assert owners.teams["payments"] == ["spiffe://example.org/ledger", "spiffe://example.org/payments/*"]


@pytest.mark.parametrize(("text", "words"), [
    (OWNERS.replace("risk: [", "risk: [spiffe://example.org/ledger, "), "also claimed by team payments"),
    (OWNERS.replace("risk:", "Risk:"), "team 'Risk'"),
    (OWNERS.replace("spiffe://example.org/fraud/*", "spiffe://example.org/fr*ud"), "teams.risk[0]"),
    (OWNERS.replace("kind: Ownership", "kind: Allowlist"), "kind Ownership"),
    (OWNERS + "extra: 1\n", "unknown key(s) extra"),
    (OWNERS + "teams: {}\n", "duplicate"),
    (OWNERS.replace("platform: [spiffe://example.org/*]", "platform: []"), "non-empty list"),
    ("teams: &a [*a]\n", "ownership"),
    ("[1, 2]", "expected one document"),
    ("a: 1\n---\nb: 2\n", "expected one document"),
])
def test_bad_ownership_files_are_refused_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match="ownership") as caught:
        parse_ownership(text)
    assert words in str(caught.value)


segment = st.text(alphabet="abcd", min_size=1, max_size=2)
path = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
pattern = st.builds(lambda p, prefix: IdPattern.parse(f"spiffe://example.org{p}" + ("/*" if prefix else "")),
                    path, st.booleans())


@given(pattern, pattern, path)
def test_covers_means_every_id_the_destination_matches_is_owned(owned: IdPattern, destination: IdPattern,
                                                                 id_path: str) -> None:
    sid = SpiffeId.parse(f"spiffe://example.org{id_path}")
    if covers(owned, destination) and destination.matches(sid):
        assert owned.matches(sid)
    if not destination.is_prefix and covers(owned, destination):
        assert owned.matches(SpiffeId.parse(str(destination)))


rule = st.builds(AllowRule, pattern, st.none() | st.integers(0, 10**6).map(
    lambda s: datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=s, microseconds=s % 7)))
allowlists = st.builds(
    lambda name, dest, rules, ports, mode, owner: Allowlist(name, dest, tuple({str(r.source): r for r in rules}
                                                                                .values()), ports, mode, owner),
    st.text(alphabet="abc-", min_size=1, max_size=8), pattern, st.lists(rule, min_size=1, max_size=3),
    st.lists(st.integers(1, 65535), max_size=3, unique=True).map(tuple), st.sampled_from(["enforce", "audit"]),
    st.text(alphabet="xyz ':#", max_size=6))


@given(allowlists)
def test_rendered_documents_load_back_to_the_same_allowlist(original: Allowlist) -> None:
    loaded = load_text(dump_documents([original]), "rendered", reject_expired=False)
    assert loaded.ok, loaded.problems
    assert loaded.policy.allowlists == (original,)


# --- team-scoped applies --------------------------------------------------------------------


@pytest.fixture
async def policy(tmp_path: Path) -> AsyncIterator[PolicyService]:
    async with server_runtime(tmp_path) as rt:
        service = PolicyService(rt)
        await service.set_ownership(OWNERS, ADMIN)
        await service.apply(allowlist("ledger", "spiffe://example.org/ledger")
                            + allowlist("fraud", "spiffe://example.org/fraud/*")
                            + allowlist("everything-else", "spiffe://example.org/misc"),
                            author="", comment="", expected_head=0, dry_run=False, actor=ADMIN)
        yield service


async def apply(policy: PolicyService, text: str, **kw: object) -> int:
    revision, _, _ = await policy.apply(text, author="", comment="", expected_head=0, dry_run=False,
                                        actor="spiffe://example.org/operator/pat", **kw)  # type: ignore[arg-type]
    return revision


async def names(policy: PolicyService) -> dict[str, str]:
    return {a.name: str(a.allow[0].source) for a in PolicyService.parse_stored(await policy.head()).allowlists}


async def test_a_team_apply_replaces_that_teams_allowlists_only(policy: PolicyService) -> None:
    before = PolicyService.parse_stored(await policy.head())
    await apply(policy, allowlist("ledger-v2", "spiffe://example.org/ledger", "spiffe://example.org/batch")
                + allowlist("payments-api", "spiffe://example.org/payments/api"), team="payments")
    after = PolicyService.parse_stored(await policy.head())
    assert await names(policy) == {"fraud": "spiffe://example.org/web", "everything-else": "spiffe://example.org/web",
                                   "ledger-v2": "spiffe://example.org/batch",
                                   "payments-api": "spiffe://example.org/web"}
    untouched = [a for a in before.allowlists if a.name != "ledger"]
    assert [a for a in after.allowlists if a.name in ("fraud", "everything-else")] == untouched
    # The payments team's own documents are stored as written.
    assert "metadata: {name: payments-api}" in (await policy.head() or pytest.fail()).documents


async def test_a_team_cannot_write_a_destination_it_does_not_own(policy: PolicyService) -> None:
    head = (await policy.head() or pytest.fail()).revision
    with pytest.raises(PermissionDeniedError, match=r"team payments does not own the destination of fraud-2 "):
        await apply(policy, allowlist("fraud-2", "spiffe://example.org/fraud/model"), team="payments")
    with pytest.raises(InvalidArgumentError, match="--allow-empty"):
        await apply(policy, "", team="payments")
    assert (await policy.head() or pytest.fail()).revision == head
    refused = [e for e in await audit_events(policy._rt, "policy.apply") if e.outcome == "denied"]
    assert refused[0].details["team"] == "payments" and "fraud-2" in str(refused[0].details["reason"])
    await apply(policy, "", team="payments", allow_empty=True)
    assert "ledger" not in await names(policy) and "fraud" in await names(policy)


async def test_a_policy_author_is_confined_to_its_team(policy: PolicyService) -> None:
    whole = PolicyService.parse_stored(await policy.head())
    text = dump_documents(whole.allowlists)
    # A whole-policy apply by a payments author that also changes risk's allowlist: refused.
    changed = text.replace("spiffe://example.org/web", "spiffe://example.org/attacker")
    with pytest.raises(PermissionDeniedError, match=r"may change only allowlists .* not everything-else .*, fraud"):
        await apply(policy, changed, scope="payments")
    # The same author may change its own allowlists, in a whole-policy apply or a team apply.
    mine = text.replace("- from: spiffe://example.org/web\n", "- from: spiffe://example.org/batch\n", 1)
    assert "ledger" in mine.split("batch")[0]
    await apply(policy, mine, scope="payments")
    await apply(policy, allowlist("ledger", "spiffe://example.org/ledger"), team="payments", scope="payments")
    with pytest.raises(PermissionDeniedError, match="no team"):
        await apply(policy, allowlist("ledger", "spiffe://example.org/ledger", "spiffe://example.org/x"),
                    team="payments", scope="")
    # Rolling back to a revision that differs in an allowlist of another team: refused too.
    with pytest.raises(PermissionDeniedError, match="may change only"):
        await policy.rollback(2, author="", comment="", expected_head=0, actor="pat", scope="risk")
