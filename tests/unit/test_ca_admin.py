"""The CA as admins see and steer it: the journal as a list of authorities, and root-rotation
steps taken by hand (refusals audited). A real SQLite store and software CA."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.unit.server_runtime import ADMIN, Clock, audit_events, server_runtime
from trustmesh.controlplane.ca_admin import CAAdmin, authorities
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    async with server_runtime(tmp_path) as rt:
        yield rt


async def test_a_new_ca_shows_one_active_root_signing_ca_and_jwt_key(runtime: ServerRuntime) -> None:
    status = await CAAdmin(runtime).status()
    assert [(a.kind, a.state) for a in status.authorities] == [
        ("x509_root", "active"), ("x509_signing", "active"), ("jwt_key", "active")]
    root, signing, jwt_key = status.authorities
    cert = x509.load_der_x509_certificate(root.certificate)
    assert root.serial == f"{cert.serial_number:x}" and root.not_before == cert.not_valid_before_utc.timestamp()
    assert root.key_id == runtime.ca.journal.active_root().id and signing.key_id == root.key_id
    assert signing.replica == "r1" and signing.certificate and not jwt_key.certificate
    assert jwt_key.key_id == runtime.ca.journal.active_jwt_key().kid
    assert status.leader == "" and status.next_step == ""


def _clock(rt: ServerRuntime) -> Clock:
    assert isinstance(rt.clock, Clock)
    return rt.clock


async def test_steps_by_hand(runtime: ServerRuntime) -> None:
    ca = CAAdmin(runtime)
    prepared = await ca.rotate_root("next", ADMIN)
    assert "prepared" in prepared.detail
    assert sorted(a.state for a in prepared.authorities if a.kind == "x509_root") == ["active", "prepared"]
    # Partners fetch the bundle once per refresh hint (5 minutes by default): then it may activate.
    root = runtime.ca.journal.prepared_root()
    assert root is not None
    _clock(runtime).now = root.created_at + runtime.config.bundle_refresh_hint.total_seconds() + 1
    activated = await ca.rotate_root("next", ADMIN)
    assert "active" in activated.detail and not activated.forced
    assert sorted(a.state for a in activated.authorities if a.kind == "x509_root") == ["active", "old"]
    assert activated.authorities == authorities(runtime.ca.journal)
    assert [e.kind for e in await runtime.store.list_audit_events()] == ["ca.root_prepared", "ca.root_activated"]


async def test_activation_waits_for_partners_to_have_fetched_the_root(runtime: ServerRuntime) -> None:
    ca = CAAdmin(runtime)
    await ca.rotate_root("prepare", ADMIN)
    root = runtime.ca.journal.prepared_root()
    assert root is not None
    _clock(runtime).now = root.created_at + 299
    for step in ("activate", "next"):
        with pytest.raises(FailedPreconditionError, match=r"can be activated from \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
                                                          r"\(or now with --force\)$"):
            await ca.rotate_root(step, ADMIN)
    assert runtime.ca.journal.prepared_root() == root
    forced = await ca.rotate_root("activate", ADMIN, force=True)
    assert forced.forced and runtime.ca.journal.active_root().id == root.id
    refused = await audit_events(runtime, "ca.rotation_refused")
    assert [(e.subject, e.outcome) for e in refused] == [("activate", "denied")] * 2
    [activated] = await audit_events(runtime, "ca.root_activated")
    assert activated.details["forced"] is True


async def test_out_of_order_steps_are_refused_audited_and_change_nothing(runtime: ServerRuntime) -> None:
    ca = CAAdmin(runtime)
    before = authorities(runtime.ca.journal)
    with pytest.raises(FailedPreconditionError, match="nothing to retire"):
        await ca.rotate_root("retire", ADMIN)
    with pytest.raises(FailedPreconditionError):
        await ca.rotate_root("activate", ADMIN)
    with pytest.raises(InvalidArgumentError, match="^unknown root rotation step 7; use prepare, activate or retire$"):
        await ca.rotate_root("7", ADMIN)
    assert authorities(runtime.ca.journal) == before
    refused = await audit_events(runtime, "ca.rotation_refused")
    assert [(e.subject, e.outcome) for e in refused] == [("retire", "denied"), ("activate", "denied")]
