"""Policy revisions on the server: validate, diff, apply atomically, roll back, compile.

A revision is the full text of every allowlist document. `apply` validates first and writes
nothing on any problem; the new revision is one compare-and-swap on the policy head, so two
concurrent applies cannot both win; every apply and refusal is audited.
"""

from __future__ import annotations

import difflib
import logging
from datetime import datetime, timezone

import yaml

from trustmesh.clip import AUTHOR, COMMENT, REASON, clip
from trustmesh.clock import format_utc
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import PolicyRevision as PolicyRevision  # re-exported: the API's value
from trustmesh.errors import ConflictError, InvalidArgumentError, NotFoundError
from trustmesh.policy import Policy, load_text
from trustmesh.policy.loader import REVISION
from trustmesh.policy.model import Allowlist
from trustmesh.policy.wire import compiled_size_problem

log = logging.getLogger("trustmesh.policy_store")

MAX_PROBLEMS_SHOWN = 50
# A revision's author and comment are the caller's words, kept with the revision: bounded.


def canonical(policy: Policy) -> str:
    """A stable text of the policy's meaning (not its formatting), for diffs."""
    def one(a: Allowlist) -> dict[str, object]:
        return {"name": a.name, "owner": a.owner, "destination": str(a.destination), "ports": list(a.ports),
                "mode": a.mode,
                "allow": [{"from": str(r.source), **({"expires": format_utc(r.expires)}
                                                      if r.expires else {})} for r in a.allow]}
    docs = [one(a) for a in sorted(policy.allowlists, key=lambda a: a.name)]
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

    def parse_new(self, documents: str) -> Policy:
        loaded = load_text(documents, "policy", self._now(), limits=REVISION)
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
        return Policy(loaded.policy.allowlists, record.revision)

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

    async def diff(self, documents: str, against: int = 0) -> tuple[bool, str, int]:
        new = self.parse_new(documents)
        base = await (self._rt.store.get_policy_revision(against) if against else self.head())
        old = self.parse_stored(base)
        text = diff_text(old, new, f"revision {base.revision if base else 0}", "proposed")
        return bool(text), text, base.revision if base else 0

    async def apply(self, documents: str, *, author: str, comment: str, expected_head: int, dry_run: bool,
                    actor: str, kind: str = "policy.apply") -> tuple[int, bool, str]:
        """Validate, diff against the head and append a revision (unless nothing changed or
        `dry_run`): (head revision after, changed, diff). `expected_head` 0: do not check."""
        author, comment = clip(author, AUTHOR), clip(comment, COMMENT)
        try:
            new = self.parse_new(documents)
            head = await self.head()
            current = head.revision if head else 0
            if expected_head and expected_head != current:
                raise ConflictError(f"the policy head is revision {current}, not {expected_head}; "
                                    "review `trustmesh policy diff` and apply again")
            text = diff_text(self.parse_stored(head), new, f"revision {current}", "proposed")
            if not text or dry_run:
                return current, bool(text), text
            record = await self._rt.store.append_policy_revision(
                documents, author or actor, comment, self._rt.clock(), expected_head=current)
        except (InvalidArgumentError, ConflictError) as err:
            await self._rt.audit.record(kind, actor=actor, subject="policy", outcome="denied",
                                        reason=clip(str(err), REASON))
            raise
        await self._rt.audit.record(kind, actor=actor, subject="policy", revision=record.revision,
                                    sha256=record.sha256, allowlists=[a.name for a in new.allowlists],
                                    comment=comment)
        return record.revision, True, text

    async def rollback(self, revision: int, *, author: str, comment: str, expected_head: int,
                       actor: str) -> int:
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
                                         actor=actor, kind="policy.rollback")
        return new_rev
