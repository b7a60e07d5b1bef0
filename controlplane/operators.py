"""Operators: the people who administer trustmesh, each with two factors and only the roles it needs.

An admin adds an operator (`operator add`), which yields a one-time enrollment token (24 h,
stored as its SHA-256). Enrolling with it sets the password (stored as an Argon2id hash) and
creates a TOTP secret (RFC 6238: 6 digits, 30 s), returned once and stored sealed under the
KEK. Logging in with the password and a current code signs the operator's CSR as a
short-lived certificate for spiffe://<td>/operator/<name>, which the remote admin listener
accepts. The certificate names the operator record's `epoch` (in the admin-binding extension,
x509svid.ADMIN_ENTRY_OID, as "operator:<epoch>"): resetting or disabling the operator draws a
new epoch, which ends every certificate issued before at once. Roles are read from the record
at every call, never from the certificate, so a role taken away is gone at the next call.

Every failure to log in or enroll answers with the same words, whichever factor was wrong;
`--login-max-failures` failures within `--login-failure-window` lock the operator for
`--login-lockout`. A TOTP code is accepted once: the newest time step used is kept, and a
code of that step or an older one is refused (login and step-up alike).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography import x509

from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.call_source import call_source
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import OperatorRecord, OperatorState
from trustmesh.errors import (
    AlreadyExistsError,
    CAError,
    FailedPreconditionError,
    InvalidArgumentError,
    KeyEncryptionError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TrustmeshError,
    UnauthenticatedError,
)
from trustmesh.naming import NAME, OPERATOR_ROLES
from trustmesh.ratelimit import KeyedTokenBuckets
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import admin_entry_of

OPERATOR_PATH = "/operator/"
ROLES = OPERATOR_ROLES
ENROLLMENT_TTL = timedelta(hours=24)
TOTP_DIGITS = 6
TOTP_INTERVAL = 30
# Codes of the step before and after now are accepted too: a code typed as it turns over,
# and clocks a little apart.
TOTP_WINDOW = 1
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_CSR_BYTES = 16 * 1024
TOTP_ISSUER = "trustmesh"
_EPOCH_PREFIX = "operator:"
# The one answer to every failed login or enrollment: it must not tell which factor was wrong,
# nor whether the operator exists.
LOGIN_REFUSED = ("login refused: wrong operator name, password or one-time code, or the operator is disabled, "
                 "locked after repeated failures (wait and retry) or not enrolled; ask an admin if it persists")
ENROLL_REFUSED = ("enrollment refused: the token is wrong, used or expired; ask an admin for a new one "
                  "(`trustmesh operator reset NAME`)")
STEP_UP_REFUSED = ("this call needs a current one-time code of yours: pass --otp CODE (a code is accepted once; "
                   "wait for the next one if you just used it)")


def check_name(text: str, what: str = "operator name") -> str:
    if not NAME.fullmatch(text):
        raise InvalidArgumentError(f"{what} {text[:80]!r} must be 1-63 characters of a-z, 0-9 and '-', "
                                   "starting with a letter")
    return text


def check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    if not roles:
        raise InvalidArgumentError(f"give at least one --role: {', '.join(ROLES)}")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise InvalidArgumentError(f"unknown role {unknown[0][:40]!r}; the roles are {', '.join(ROLES)}")
    return tuple(sorted(set(roles), key=ROLES.index))


def operator_id(td: TrustDomain, name: str) -> SpiffeId:
    return td.spiffe_id(OPERATOR_PATH + name)


def operator_name_of(spiffe_id: SpiffeId, td: TrustDomain) -> str | None:
    """The operator an ID names (spiffe://<td>/operator/<name>), else None."""
    if spiffe_id.trust_domain != td or not spiffe_id.path.startswith(OPERATOR_PATH):
        return None
    name = spiffe_id.path[len(OPERATOR_PATH):]
    return name if NAME.fullmatch(name) else None


# Enrollment tokens start with this: recognisable in a leak scan, and never with "-", which the
# CLI would read as a flag (`--token -abc…`).
ENROLL_PREFIX = "tmen_"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _totp_aad(name: str) -> bytes:
    return b"trustmesh:operator-totp:" + name.encode()


@dataclass(frozen=True)
class Enrollment:
    record: OperatorRecord
    token: str
    expires_at: float


@dataclass(frozen=True)
class OperatorCertificate:
    cert_chain: tuple[x509.Certificate, ...]
    spiffe_id: SpiffeId
    expires_at: float
    roles: tuple[str, ...]


class Operators:
    """Add, enroll, log in and authenticate operators; `actor` names who asked, for the audit log."""

    def __init__(self, rt: ServerRuntime, kek: KeyEncryptionKey) -> None:
        self._rt = rt
        self._kek = kek
        self._td = rt.config.trust_domain
        # Argon2id (the library's default type) with its default cost: 64 MiB, 3 passes.
        self._hasher = PasswordHasher()
        # Before any factor is checked (each check costs an Argon2 hash and an audit event):
        # how often one address may try, whatever names it tries.
        per_minute, burst = rt.config.login_per_minute, rt.config.login_burst
        self._attempts = KeyedTokenBuckets(per_minute / 60, max(1, burst)) if per_minute else None
        self._limited = rt.metrics.counter("trustmesh_operator_logins_rate_limited_total",
                                           "enrollment and login attempts refused because their address sent too many")
        # A hash to verify unknown names against, so that they cost what known ones cost.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(16))

    @property
    def trust_domain(self) -> TrustDomain:
        return self._td

    # --- administration -------------------------------------------------------------------

    async def add(self, name: str, roles: Sequence[str], team: str, actor: str) -> Enrollment:
        check_name(name)
        checked = check_roles(roles)
        if team:
            check_name(team, "team")
        token, record = self._new_enrollment(OperatorRecord(
            name=name, roles=checked, team=team, state=OperatorState.PENDING, created_at=self._rt.clock(),
            created_by=actor, epoch=""))
        try:
            record = await self._rt.store.create_operator(record)
        except AlreadyExistsError as err:
            raise AlreadyExistsError(f"operator {name} already exists; `trustmesh operator reset {name}` gives it "
                                     "a new enrollment token") from err
        await self._rt.audit.record("operator.add", actor=actor, subject=name, roles=list(checked), team=team,
                                    enrollment_expires_at=int(record.enroll_expires_at))
        return Enrollment(record, token, record.enroll_expires_at)

    def _new_enrollment(self, record: OperatorRecord) -> tuple[str, OperatorRecord]:
        """A fresh token, and `record` with no credentials and a new epoch (old certificates die)."""
        token = ENROLL_PREFIX + secrets.token_urlsafe(32)
        return token, replace(
            record, state=OperatorState.PENDING, epoch=secrets.token_hex(8), enroll_hash=_token_hash(token),
            enroll_expires_at=self._rt.clock() + ENROLLMENT_TTL.total_seconds(), password_hash="", totp_sealed="",
            enrolled_at=0.0, failures=(), locked_until=0.0)

    async def list(self) -> list[OperatorRecord]:
        return sorted(await self._rt.store.list_operators(), key=lambda r: r.name)

    async def get(self, name: str) -> OperatorRecord:
        try:
            return await self._rt.store.get_operator(check_name(name))
        except NotFoundError:
            raise NotFoundError(f"no operator {name}; `trustmesh operator list` shows them") from None

    async def reset(self, name: str, actor: str) -> Enrollment:
        token, record = self._new_enrollment(await self.get(name))
        record = await self._rt.store.replace_operator(record)
        await self._rt.audit.record("operator.reset", actor=actor, subject=name,
                                    enrollment_expires_at=int(record.enroll_expires_at))
        return Enrollment(record, token, record.enroll_expires_at)

    async def disable(self, name: str, actor: str) -> OperatorRecord:
        record = await self.get(name)
        if record.state is OperatorState.DISABLED:
            raise FailedPreconditionError(f"operator {name} is already disabled")
        record = await self._rt.store.replace_operator(replace(
            record, state=OperatorState.DISABLED, epoch=secrets.token_hex(8), enroll_hash=""))
        await self._rt.audit.record("operator.disable", actor=actor, subject=name)
        return record

    async def remove(self, name: str, actor: str) -> None:
        await self.get(name)
        await self._rt.store.delete_operator(name)
        await self._rt.audit.record("operator.remove", actor=actor, subject=name)

    # --- enrollment and login (the login listener: nobody is known yet) --------------------

    def _admit(self) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an attempt from an address that tries too often."""
        address = call_source.get()  # the login listener names the peer's host (callers.anonymous)
        if self._attempts is None or self._attempts.allow(address):
            return
        self._limited.inc()
        raise ResourceExhaustedError(f"too many login attempts from {address or 'this address'}; retry in "
                                     f"{max(1, round(self._attempts.retry_after(address)))}s")

    async def enroll(self, token: str, password: str) -> tuple[OperatorRecord, str]:
        """Set the password of the operator `token` was issued for; its new TOTP URI."""
        self._admit()
        wanted = _token_hash(token) if 0 < len(token) <= 256 else ""
        now = self._rt.clock()
        found = next((r for r in await self._rt.store.list_operators()
                      if r.enroll_hash and hmac.compare_digest(r.enroll_hash, wanted)), None)
        if found is None or found.state is not OperatorState.PENDING or found.enroll_expires_at <= now:
            await self._rt.audit.record("operator.enroll", actor="anonymous", subject=found.name if found else "",
                                        outcome="denied", reason="unknown, used or expired token")
            raise UnauthenticatedError(ENROLL_REFUSED)
        _check_password(password)
        secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        sealed = base64.b64encode(self._kek.seal(secret.encode(), _totp_aad(found.name))).decode()
        record = await self._rt.store.replace_operator(replace(
            found, state=OperatorState.ACTIVE, enroll_hash="", enroll_expires_at=0.0, password_hash=password_hash,
            totp_sealed=sealed, enrolled_at=now, last_otp_step=0))
        await self._rt.audit.record("operator.enroll", actor=str(operator_id(self._td, found.name)),
                                    subject=found.name)
        uri = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL).provisioning_uri(
            name=f"{found.name}@{self._td.name}", issuer_name=TOTP_ISSUER)
        return record, uri

    async def login(self, name: str, password: str, otp: str, csr: bytes, ttl: timedelta) -> OperatorCertificate:
        self._admit()
        if not timedelta(0) <= ttl <= timedelta(hours=12):
            raise InvalidArgumentError("the certificate lifetime must be at most 12h")
        if not csr or len(csr) > MAX_CSR_BYTES:
            raise InvalidArgumentError("give a PKCS#10 certificate signing request (DER) for your own key")
        record = None
        if NAME.fullmatch(name):
            try:
                record = await self._rt.store.get_operator(name)
            except NotFoundError:
                record = None
        password_ok = await asyncio.to_thread(self._verify_password, record, password)
        now = self._rt.clock()
        if record is None:
            await self._rt.audit.record("operator.login", actor="anonymous", subject=name[:80], outcome="denied",
                                        reason="no such operator")
            raise UnauthenticatedError(LOGIN_REFUSED)
        if record.locked_until > now:
            await self._rt.audit.record("operator.login", actor="anonymous", subject=name, outcome="denied",
                                        reason="locked", locked_until=int(record.locked_until))
            raise UnauthenticatedError(LOGIN_REFUSED)
        if record.state is not OperatorState.ACTIVE:
            await self._rt.audit.record("operator.login", actor="anonymous", subject=name, outcome="denied",
                                        reason=f"operator is {record.state}")
            raise UnauthenticatedError(LOGIN_REFUSED)
        step = self._otp_step(record, otp, now) if password_ok else None
        if step is None:
            await self._failed(record, now, "wrong password" if not password_ok else "wrong or reused code")
            raise UnauthenticatedError(LOGIN_REFUSED)
        record = await self._rt.store.replace_operator(replace(record, last_otp_step=step, failures=()))
        sid = operator_id(self._td, name)
        lifetime = ttl or self._rt.config.operator_cert_ttl
        try:
            (outcome,) = await self._rt.ca.sign_x509_svids([(csr, sid, lifetime, (), _EPOCH_PREFIX + record.epoch)])
        except CAError as err:
            raise InvalidArgumentError(str(err)) from err
        if isinstance(outcome, TrustmeshError):
            raise InvalidArgumentError(f"cannot sign the request: {outcome}")
        expires = outcome.leaf.not_valid_after_utc.timestamp()
        await self._rt.audit.record("operator.login", actor=str(sid), subject=name, roles=list(record.roles),
                                    serial=f"{outcome.leaf.serial_number:x}", not_after=int(expires))
        return OperatorCertificate(tuple(outcome.cert_chain), sid, expires, record.roles)

    def _verify_password(self, record: OperatorRecord | None, password: str) -> bool:
        stored = record.password_hash if record is not None and record.password_hash else self._decoy
        try:
            return bool(self._hasher.verify(stored, password[:MAX_PASSWORD])) and record is not None \
                and bool(record.password_hash)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _failed(self, record: OperatorRecord, now: float, reason: str) -> None:
        window = self._rt.config.login_failure_window.total_seconds()
        failures = tuple(t for t in record.failures if t > now - window) + (now,)
        locked = len(failures) >= self._rt.config.login_max_failures
        updated = replace(record, failures=() if locked else failures,
                          locked_until=now + self._rt.config.login_lockout.total_seconds() if locked else 0.0)
        try:
            await self._rt.store.replace_operator(updated)
        except TrustmeshError:
            pass  # a concurrent login changed the record; this failure is still audited below
        await self._rt.audit.record("operator.login", actor="anonymous", subject=record.name, outcome="denied",
                                    reason=reason, failures=len(failures))
        if locked:
            await self._rt.audit.record("operator.locked", actor="system", subject=record.name, outcome="denied",
                                        failures=len(failures), locked_until=int(updated.locked_until))

    def _otp_step(self, record: OperatorRecord, otp: str, now: float) -> int | None:
        """The time step `otp` is the code of, if it is current and newer than the last one used."""
        if not (len(otp) == TOTP_DIGITS and otp.isascii() and otp.isdigit()) or not record.totp_sealed:
            return None
        try:
            secret = self._kek.open(base64.b64decode(record.totp_sealed), _totp_aad(record.name)).decode()
        except (KeyEncryptionError, ValueError):
            return None
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL)
        current = int(now) // TOTP_INTERVAL
        for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
            if hmac.compare_digest(totp.at(step * TOTP_INTERVAL), otp):
                return step if step > record.last_otp_step else None
        return None

    # --- calls with an operator certificate -----------------------------------------------

    async def authenticate(self, spiffe_id: SpiffeId, leaf: x509.Certificate) -> OperatorRecord | None:
        """The operator a client certificate belongs to: None when it names no operator;
        UNAUTHENTICATED (audited) when the operator may not act with it now (removed, disabled,
        not enrolled, or reset or disabled since this certificate was issued)."""
        name = operator_name_of(spiffe_id, self._td)
        if name is None:
            return None
        binding = admin_entry_of(leaf)
        try:
            record: OperatorRecord | None = await self._rt.store.get_operator(name)
        except NotFoundError:
            record = None
        if record is None or record.state is not OperatorState.ACTIVE or not record.epoch \
                or not binding.startswith(_EPOCH_PREFIX) \
                or not hmac.compare_digest(binding[len(_EPOCH_PREFIX):], record.epoch):
            why = ("no such operator" if record is None else f"operator is {record.state}"
                   if record.state is not OperatorState.ACTIVE else "certificate from before a reset or disable")
            await self._rt.audit.record("operator.call", actor=str(spiffe_id), subject=name, outcome="denied",
                                        reason=why)
            raise UnauthenticatedError(f"the operator certificate of {name} is no longer valid (the operator was "
                                       "reset, disabled or removed): log in again with `trustmesh login`")
        return record

    async def step_up(self, name: str, otp: str, method: str) -> None:
        """A privileged call: `otp` must be a current, unused code of the operator."""
        record = await self._rt.store.get_operator(name)
        now = self._rt.clock()
        step = self._otp_step(record, otp, now) if otp else None
        if step is None:
            await self._rt.audit.record("operator.step_up", actor=str(operator_id(self._td, name)), subject=method,
                                        outcome="denied", reason="no code" if not otp else "wrong or reused code")
            raise PermissionDeniedError(STEP_UP_REFUSED)
        await self._rt.store.replace_operator(replace(record, last_otp_step=step))


def _check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidArgumentError(f"the password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long")
    if password.strip() != password:
        raise InvalidArgumentError("the password must not start or end with white space (a stray newline?)")


__all__ = ["ENROLL_REFUSED", "LOGIN_REFUSED", "OPERATOR_PATH", "ROLES", "Enrollment", "OperatorCertificate",
           "OperatorRecord", "OperatorState", "Operators", "check_name", "check_roles", "operator_id",
           "operator_name_of"]
