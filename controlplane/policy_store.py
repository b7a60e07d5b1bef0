"""Policy revisions on the server: validate, diff, apply atomically, roll back, compile.

A revision is the full text of every allowlist document. `apply` validates first and writes
nothing on any problem; the new revision is one compare-and-swap on the policy head, so two
concurrent applies cannot both win; every apply and refusal is audited.

Teams own destinations (the ownership file, trustmesh/policy/ownership.py, set by an admin).
`apply(team=…)` replaces that team's allowlists only: the new revision is the head's other
allowlists (re-rendered as documents) followed by the documents given. A caller `scoped` to a
team (a policy-author who is not an admin) may change only allowlists its team owns, whatever
it applies or rolls back to: every allowlist added, removed or changed must be its team's.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import replace
from datetime import datetime, timezone

import yaml

from trustmesh.clip import AUTHOR, COMMENT, REASON, clip
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import OwnershipRecord
from trustmesh.controlplane.store.records import PolicyRevision as PolicyRevision  # re-exported: the API's value
from trustmesh.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from trustmesh.naming import NAME
from trustmesh.policy import Policy, load_text
from trustmesh.policy.loader import REVISION, allow_rule_to_dict, dump_documents
from trustmesh.policy.model import Allowlist, PolicyError
from trustmesh.policy.ownership import Ownership, parse_ownership
from trustmesh.policy.responses import rule_to_dict
from trustmesh.policy.wire import compiled_size_problem

log = logging.getLogger("trustmesh.policy_store")

MAX_PROBLEMS_SHOWN = 50
# A revision's author and comment are the caller's words, kept with the revision: bounded.


def canonical(policy: Policy) -> str:
    """A stable text of the policy's meaning (not its formatting), for diffs."""
    def one(a: Allowlist) -> dict[str, object]:
        return {"name": a.name, "owner": a.owner, "destination": str(a.destination), "ports": list(a.ports),
                "mode": a.mode,
                "allow": [allow_rule_to_dict(r) for r in a.allow]}
    docs = [one(a) for a in sorted(policy.allowlists, key=lambda a: a.name)]
    docs += [{"response": d.name, "owner": d.owner, "dry_run": d.dry_run, "rules": [rule_to_dict(r) for r in d.rules]}
             for d in sorted(policy.responses.documents, key=lambda d: d.name)]
    return "".join(yaml.safe_dump(d, sort_keys=False) + "---\n" for d in docs)


def diff_text(old: Policy, new: Policy, old_label: str, new_label: str) -> str:
    lines = difflib.unified_diff(canonical(old).splitlines(keepends=True), canonical(new).splitlines(keepends=True),
                                 fromfile=old_label, tofile=new_label)
    return "".join(lines)


class PolicyService:
    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._rt.clock(), timezone.utc)

    def parse_new(self, documents: str, *, reject_expired: bool = True) -> Policy:
        loaded = load_text(documents, "policy", self._now(), reject_expired=reject_expired, limits=REVISION)
        if loaded.ok and (too_large := compiled_size_problem(loaded.policy)):
            raise InvalidArgumentError(f"{too_large}; nothing was applied")
        if not loaded.ok:
            shown = "; ".join(str(p) for p in loaded.problems[:MAX_PROBLEMS_SHOWN])
            more = len(loaded.problems) - MAX_PROBLEMS_SHOWN
            raise InvalidArgumentError(f"the policy has {len(loaded.problems)} problem(s), nothing was applied: "
                                       f"{shown}{f'; and {more} more' if more > 0 else ''}")
        return loaded.policy

    @staticmethod
    def parse_stored(record: PolicyRevision | None) -> Policy:
        if record is None:
            return Policy()
        loaded = load_text(record.documents, f"revision {record.revision}", reject_expired=False, limits=REVISION)
        if loaded.problems:
            # Applied before a stricter rule existed (or written around the API): what is
            # refused is not enforced; say so loudly rather than deny without a trace.
            log.error("stored policy revision has problems; refused parts are not enforced revision=%d problems=%s",
                      record.revision, "; ".join(str(p) for p in loaded.problems[:MAX_PROBLEMS_SHOWN]))
        return replace(loaded.policy, revision=record.revision)  # with its Response documents

    async def head(self) -> PolicyRevision | None:
        return await self._rt.store.get_policy_head()

    async def get(self, revision: int = 0) -> PolicyRevision:
        """Revision `revision`, or the head when 0."""
        if revision:
            return await self._rt.store.get_policy_revision(revision)
        head = await self.head()
        if head is None:
            raise NotFoundError("no policy has been applied yet: everything is denied by default; "
                                "apply one with `trustmesh policy apply FILE`")
        return head

    async def revisions(self) -> list[PolicyRevision]:
        """Every revision, oldest first (as the store lists them)."""
        return await self._rt.store.list_policy_revisions()

    # --- ownership ----------------------------------------------------------------------

    async def ownership(self) -> tuple[Ownership, OwnershipRecord | None]:
        record = await self._rt.store.get_policy_owners()
        if record is None:
            return Ownership(), None
        try:
            return parse_ownership(record.documents, "stored ownership file"), record
        except PolicyError as err:  # written around the API: own nothing rather than guess
            log.error("stored ownership file is invalid; no team owns anything error=%s", err)
            return Ownership(), record

    async def set_ownership(self, documents: str, actor: str) -> Ownership:
        try:
            ownership = parse_ownership(documents, "ownership file")
        except PolicyError as err:
            await self._rt.audit.record("policy.owners", actor=actor, subject="ownership", outcome="denied",
                                        reason=clip(str(err), REASON))
            raise InvalidArgumentError(f"{err}; nothing was changed") from None
        current = await self._rt.store.get_policy_owners()
        record = OwnershipRecord(documents, actor, self._rt.clock())
        try:
            await self._rt.store.put_policy_owners(record, current.revision if current else 0)
        except (ConflictError, AlreadyExistsError):
            raise ConflictError("the ownership file changed while this one was being set; look at "
                                "`trustmesh policy owners` and set it again") from None
        await self._rt.audit.record("policy.owners", actor=actor, subject="ownership", teams=ownership.teams)
        return ownership

    async def _compose(self, documents: str, team: str, head: PolicyRevision | None,
                       allow_empty: bool) -> tuple[str, Policy]:
        """The text and meaning of the revision that applying `documents` (for `team`) makes."""
        if not team:
            return documents, self.parse_new(documents)
        if not NAME.fullmatch(team):
            raise InvalidArgumentError(f"--team {team[:64]!r}: 1-63 characters of a-z, 0-9 and '-'")
        given = self.parse_new(documents)
        if given.responses.documents:
            raise PermissionDeniedError(
                f"a team apply (--team {team}) carries allowlists only; Response documents "
                f"({', '.join(d.name for d in given.responses.documents)}) are applied without --team")
        if not given.allowlists and not allow_empty:
            raise InvalidArgumentError(f"no allowlists given: this would remove every allowlist of team {team}; "
                                       "pass --allow-empty to do that deliberately")
        ownership, _ = await self.ownership()
        foreign = [a for a in given.allowlists if ownership.team_of(a.destination) != team]
        if foreign:
            raise PermissionDeniedError(
                f"team {team} does not own the destination of {_names(foreign)}; `trustmesh policy owners` "
                "shows who owns what")
        stored = self.parse_stored(head)
        kept = [a for a in stored.allowlists if ownership.team_of(a.destination) != team]
        # The responses in force stay as they are: they are no team's.
        kept_text = dump_documents(kept, stored.responses)
        text = kept_text + ("---\n" if kept_text else "") + documents
        # Other teams' rules may have lapsed since they were applied: they stay, lapsed.
        return text, self.parse_new(text, reject_expired=False)

    @staticmethod
    def _check_scope(old: Policy, new: Policy, scope: str | None, ownership: Ownership) -> None:
        """A caller scoped to a team may add, remove or change only allowlists that team owns."""
        if scope is None:
            return
        if not scope:
            raise PermissionDeniedError("you hold policy-author but belong to no team, so you own no "
                                        "destination; an admin can give you one (`operator add … --team`)")
        before = {a.name: a for a in old.allowlists}
        after = {a.name: a for a in new.allowlists}
        touched = [a for name in sorted(before.keys() | after.keys())
                   if before.get(name) != after.get(name) for a in (before.get(name), after.get(name)) if a]
        if old.responses != new.responses:
            raise PermissionDeniedError(f"team {scope} may change only its allowlists; Response documents "
                                        "(what anomalies lead to) are changed by a policy-author without a team "
                                        "or an admin")
        foreign = [a for a in touched if ownership.team_of(a.destination) != scope]
        if foreign:
            raise PermissionDeniedError(
                f"team {scope} may change only allowlists for destinations it owns, not {_names(foreign)}; "
                "`trustmesh policy owners` shows who owns what (apply with --team " + scope + ")")

    async def diff(self, documents: str, against: int = 0, team: str = "") -> tuple[bool, str, int]:
        base = await (self._rt.store.get_policy_revision(against) if against else self.head())
        _, new = await self._compose(documents, team, base, allow_empty=True)
        old = self.parse_stored(base)
        text = diff_text(old, new, f"revision {base.revision if base else 0}", "proposed")
        return bool(text), text, base.revision if base else 0

    async def apply(self, documents: str, *, author: str, comment: str, expected_head: int, dry_run: bool,
                    actor: str, kind: str = "policy.apply", team: str = "", allow_empty: bool = False,
                    scope: str | None = None) -> tuple[int, bool, str]:
        """Validate, diff against the head and append a revision (unless nothing changed or
        `dry_run`): (head revision after, changed, diff). `expected_head` 0: do not check.
        `team`: replace that team's allowlists only. `scope`: the team a policy-author caller
        is confined to (None: not confined)."""
        author, comment = clip(author, AUTHOR), clip(comment, COMMENT)
        try:
            head = await self.head()
            current = head.revision if head else 0
            if scope and team and team != scope:
                raise PermissionDeniedError(f"you may change only allowlists of your team {scope}, not --team {team}")
            text, new = await self._compose(documents, team, head, allow_empty)
            old = self.parse_stored(head)
            self._check_scope(old, new, scope, (await self.ownership())[0] if scope is not None else Ownership())
            if expected_head and expected_head != current:
                raise ConflictError(f"the policy head is revision {current}, not {expected_head}; "
                                    "review `trustmesh policy diff` and apply again")
            diff = diff_text(old, new, f"revision {current}", "proposed")
            if not diff or dry_run:
                return current, bool(diff), diff
            record = await self._rt.store.append_policy_revision(
                text, author or actor, comment, self._rt.clock(), expected_head=current)
        except (InvalidArgumentError, ConflictError, PermissionDeniedError) as err:
            await self._rt.audit.record(kind, actor=actor, subject="policy", outcome="denied",
                                        reason=clip(str(err), REASON), **({"team": team} if team else {}))
            raise
        await self._rt.audit.record(kind, actor=actor, subject="policy", revision=record.revision,
                                    sha256=record.sha256, allowlists=[a.name for a in new.allowlists],
                                    comment=comment, **({"team": team} if team else {}))
        return record.revision, True, diff

    async def rollback(self, revision: int, *, author: str, comment: str, expected_head: int,
                       actor: str, scope: str | None = None) -> int:
        if revision <= 0:
            raise InvalidArgumentError("name the revision to roll back to; see `trustmesh policy history`")
        comment = clip(comment, COMMENT)
        try:
            target = await self._rt.store.get_policy_revision(revision)
        except NotFoundError:
            raise NotFoundError(f"there is no policy revision {revision}; see `trustmesh policy history`") from None
        # Re-applying old text: rules that have lapsed since would be refused as "in the past",
        # which is right: a rollback must not silently resurrect expired access.
        new_rev, _, _ = await self.apply(target.documents, author=author, expected_head=expected_head,
                                         comment=comment or f"rollback to revision {revision}", dry_run=False,
                                         actor=actor, kind="policy.rollback", scope=scope)
        return new_rev


def _names(allowlists: list[Allowlist]) -> str:
    shown = ", ".join(f"{a.name} ({a.destination})" for a in allowlists[:5])
    return shown + (f" and {len(allowlists) - 5} more" if len(allowlists) > 5 else "")
