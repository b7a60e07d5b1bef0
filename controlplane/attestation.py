"""Node attestation (transport-free): join tokens and x509pop.

Join token: single-use, expiring, stored only hashed; consumed in the same transaction that
records the attested node, so a token can never admit two agents. x509pop: the node proves
possession of the key of a certificate that chains to a configured node CA, answering a
fresh challenge; this lets nodes re-attest without a human.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from trustmesh.controlplane.attest_failures import AttestationFailures
from trustmesh.controlplane.call_source import call_source
from trustmesh.controlplane.clones import next_superseded
from trustmesh.controlplane.registration import NODE_NAME, token_hash
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import AttestedNode, label_pairs
from trustmesh.duration import format_duration
from trustmesh.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SvidError,
    TrustmeshError,
)
from trustmesh.labels import CertLabel, LabelError, check_value
from trustmesh.naming import agent_id
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import X509Svid, issued_by

X509POP_CONTEXT = b"trustmesh-x509pop-v1:"
NONCE_BYTES = 32
MAX_CHAIN = 8
MAX_PERMISSIVE_LISTENERS = 64
MAX_LISTENER_TEXT = 300


@dataclass(frozen=True)
class Attested:
    node: AttestedNode
    svid: X509Svid


@dataclass(frozen=True)
class X509PopChallenge:
    node_name: str
    leaf: x509.Certificate
    ca_fingerprint: str
    nonce: bytes


def _serial(svid: X509Svid) -> str:
    return format(svid.leaf.serial_number, "x")


class NodeAttestor:
    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt
        self._td = rt.config.trust_domain
        self._node_cas = self._load_node_cas()
        config = rt.config
        self.failures = AttestationFailures(rt.audit, rt.metrics, config.attest_audit_interval.total_seconds(),
                                            per_minute=config.attest_per_minute, burst=config.attest_burst,
                                            clock=rt.clock)

    def _load_node_cas(self) -> list[x509.Certificate]:
        path = self._rt.config.x509pop_ca
        if path is None:
            return []
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as err:
            raise TrustmeshError(f"--x509pop-ca {path}: cannot read PEM CA certificates ({err})") from err

    async def admit(self, source: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an attempt from a source address that attempts too often."""
        await self.failures.admit(source)

    async def _refusal(self, subject: str, reason: str, method: str, outcome: str) -> None:
        self._rt.metrics.counter("trustmesh_node_attestations_total", "node attestations by method and outcome",
                                 ["method", "outcome"]).inc(method=method, outcome=outcome)
        # Anyone can fail attestation as often as they like: aggregated per source address
        # (attest_failures.py). The source is the one the call layer found for this call.
        await self.failures.failed(call_source.get(), method, outcome, subject, reason)

    async def _deny(self, subject: str, reason: str, method: str) -> PermissionDeniedError:
        await self._refusal(subject, reason, method, "denied")
        return PermissionDeniedError(reason)

    async def invalid(self, reason: str, method: str = "unknown", subject: str = "unknown") -> InvalidArgumentError:
        """A malformed attestation (no evidence, a bad CSR, a stalled stream): audited too."""
        await self._refusal(subject, reason, method, "invalid")
        return InvalidArgumentError(reason)

    async def _issue(self, csr: bytes, agent: str, method: str) -> X509Svid:
        try:
            return await self._rt.ca.sign_x509_svid(csr, SpiffeId.parse(agent), self._rt.config.agent_ttl)
        except SvidError as err:
            raise await self.invalid(f"agent CSR refused: {err}", method, agent) from err

    async def _ok(self, node: AttestedNode, method: str) -> None:
        await self._rt.audit.record("node.attest", actor=f"node:{node.node_name}", subject=str(node.spiffe_id),
                                    method=method, serial=node.cert_serial)
        self._rt.metrics.counter("trustmesh_node_attestations_total", "node attestations by method and outcome",
                                 ["method", "outcome"]).inc(method=method, outcome="ok")

    # --- join token ---------------------------------------------------------------------

    async def note_permissive_listeners(self, node: AttestedNode, listeners: Sequence[str]) -> AttestedNode | None:
        """Keep on the agent's record the inbound listeners it says run `mtls: permissive`
        (they forward plaintext callers without an identity), so `agent list` shows them. The
        agent says so at each Sync stream start: written and audited only when they change.
        Returns the updated record, or None when nothing changed."""
        if len(listeners) > MAX_PERMISSIVE_LISTENERS or any(
                len(item) > MAX_LISTENER_TEXT or not item.isprintable() for item in listeners):
            raise InvalidArgumentError(f"permissive_listeners: at most {MAX_PERMISSIVE_LISTENERS} printable "
                                       f"entries of at most {MAX_LISTENER_TEXT} characters")
        wanted = tuple(sorted(set(listeners)))
        if wanted == node.permissive_listeners:
            return None
        updated = await self._rt.store.update_attested_node(
            replace(node, permissive_listeners=wanted, updated_at=self._rt.clock()),
            expected_revision=node.revision or None)
        await self._rt.audit.record("agent.permissive_listeners", actor=str(node.spiffe_id),
                                    subject=str(node.spiffe_id), listeners=list(wanted),
                                    previous=list(node.permissive_listeners),
                                    claim="reported by the agent: plaintext callers of these listeners are forwarded "
                                          "without an identity")
        return updated

    async def attest_join_token(self, token: str, csr: bytes, address: str = "") -> Attested:
        """`address`: where the agent attests from (its host), kept as where its SVID lives."""
        store = self._rt.store
        if not token or len(token) > 256:
            raise await self._deny("unknown", "join token is missing or malformed", "join_token")
        digest = token_hash(token)
        try:
            record = await store.get_join_token(digest)
        except NotFoundError:
            raise await self._deny("unknown", "join token is unknown or already used; create a new one with "
                                   "`trustmesh token create --node NAME`", "join_token") from None
        now = self._rt.clock()
        agent = str(agent_id(self._td, record.node_name))
        if record.expires_at <= now:
            with contextlib.suppress(NotFoundError):  # someone else removed it first: same outcome
                await store.delete_join_token(digest)
            ago = format_duration(timedelta(seconds=now - record.expires_at))
            raise await self._deny(agent, f"join token expired {ago} ago; create a new one with "
                                   f"`trustmesh token create --node {record.node_name}`", "join_token")
        existing = await self._find(agent)
        if existing is not None:
            raise await self._deny(agent, self._taken(existing), "join_token")
        svid = await self._issue(csr, agent, "join_token")
        node = AttestedNode(spiffe_id=agent_id(self._td, record.node_name), node_name=record.node_name,
                            attestation_type="join_token", cert_serial=_serial(svid),
                            cert_not_after=svid.expires_at.timestamp(), banned=False, created_at=now, updated_at=now,
                            selectors=(Selector("join_token", f"node:{record.node_name}"),
                                       Selector("node", f"name:{record.node_name}")),
                            renewed_from=address, renewed_at=now)
        try:
            await store.consume_join_token_and_attest(digest, node)
        except NotFoundError:
            raise await self._deny(agent, "join token was used by another agent at the same moment",
                                   "join_token") from None
        except AlreadyExistsError:
            raise await self._deny(agent, self._taken(None, agent), "join_token") from None
        # Read it back for its store revision: renewals write it with compare-and-swap, so a
        # ban landing right after this attestation can never be overwritten by a renewal.
        node = await self._find(agent) or node
        await self._ok(node, "join_token")
        return Attested(node, svid)

    def _taken(self, node: AttestedNode | None, agent: str = "") -> str:
        if node is not None and node.banned:
            return f"node {node.node_name} is banned; it cannot attest again"
        name = node.node_name if node else agent.rsplit("/", 1)[-1]
        return (f"node {name} is already attested by another agent; evict it first with "
                f"`trustmesh agent evict {name}` if this host replaces it")

    async def _find(self, agent: str) -> AttestedNode | None:
        try:
            return await self._rt.store.get_attested_node(agent)
        except NotFoundError:
            return None

    # --- x509pop --------------------------------------------------------------------------

    async def x509pop_challenge(self, chain_der: Sequence[bytes]) -> X509PopChallenge:
        if not self._node_cas:
            raise FailedPreconditionError("x509pop is not enabled on this server; start it with --x509pop-ca FILE")
        if not chain_der or len(chain_der) > MAX_CHAIN:
            raise await self._deny("unknown", f"x509pop needs 1 to {MAX_CHAIN} certificates", "x509pop")
        try:
            chain = [x509.load_der_x509_certificate(d) for d in chain_der]
        except ValueError:
            raise await self._deny("unknown", "x509pop certificate chain is not DER certificates", "x509pop") from None
        leaf = chain[0]
        if not _may_sign(leaf):
            raise await self._deny("unknown", "x509pop node certificate's key usage does not include "
                                   "digitalSignature, so it cannot prove possession", "x509pop")
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(cns[0].value) if cns else ""
        if not NODE_NAME.match(name):
            raise await self._deny("unknown", "x509pop node certificate needs a common name usable as node name "
                                   "([A-Za-z0-9._-], at most 128)", "x509pop")
        root = self._chain_root(chain)
        if root is None:
            raise await self._deny(name, "x509pop node certificate does not chain to a configured node CA, "
                                   "or is expired", "x509pop")
        return X509PopChallenge(name, leaf, root.fingerprint(hashes.SHA256()).hex(), os.urandom(NONCE_BYTES))

    def _chain_root(self, chain: list[x509.Certificate]) -> x509.Certificate | None:
        now = datetime.fromtimestamp(self._rt.clock(), timezone.utc)
        for cert in chain:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return None
        current = chain[0]
        rest = chain[1:]
        for _ in range(MAX_CHAIN):
            for root in self._node_cas:
                if issued_by(current, root) and root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                    return root
            if not rest or not issued_by(current, rest[0]) or not _is_ca(rest[0]):
                return None
            current, rest = rest[0], rest[1:]
        return None

    async def x509pop_finish(self, challenge: X509PopChallenge, signature: bytes, csr: bytes,
                             address: str = "") -> Attested:
        name = challenge.node_name
        if not _proves_possession(challenge.leaf, X509POP_CONTEXT + challenge.nonce, signature):
            raise await self._deny(name, "x509pop challenge signature is invalid: the node did not prove it holds "
                                   "the certificate's key", "x509pop")
        agent = str(agent_id(self._td, name))
        existing = await self._find(agent)
        if existing is not None and (existing.banned or existing.attestation_type != "x509pop"):
            raise await self._deny(agent, self._taken(existing), "x509pop")
        now = self._rt.clock()
        # A re-attestation replaces the SVID as a renewal does: the one it replaces is kept as
        # superseded, so a copy of it still in use elsewhere is noticed (clones.py).
        try:
            superseded = next_superseded(existing, now) if existing is not None else ()
        except PermissionDeniedError as err:
            raise await self._deny(agent, str(err), "x509pop") from None
        svid = await self._issue(csr, agent, "x509pop")
        selectors = (Selector("node", f"name:{name}"), Selector("x509pop", f"subject:cn:{name}"),
                     Selector("x509pop", f"ca:fingerprint:{challenge.ca_fingerprint}"),
                     Selector("x509pop", f"serialnumber:{format(challenge.leaf.serial_number, 'x')}"))
        # Labels from the certificate (--x509pop-label): the server reads them from evidence the
        # node proved it holds; the keys mapped are the certificate's, so they follow it.
        mapped = self._rt.config.x509pop_label
        derived = cert_labels(challenge.leaf, mapped)
        kept = {k: v for k, v in (existing.labels if existing is not None else ()) if k not in {m.key for m in mapped}}
        labels = label_pairs({**kept, **derived})
        if existing is None:
            node = AttestedNode(spiffe_id=agent_id(self._td, name), node_name=name, attestation_type="x509pop",
                                cert_serial=_serial(svid), cert_not_after=svid.expires_at.timestamp(),
                                banned=False, created_at=now, updated_at=now, selectors=selectors,
                                renewed_from=address, renewed_at=now, labels=labels)
            try:
                await self._rt.store.create_attested_node(node)
            except AlreadyExistsError:
                raise await self._deny(agent, self._taken(None, agent), "x509pop") from None
        else:
            # Re-attestation of a known x509pop node: the new SVID replaces the old one.
            node = await self._rt.store.update_attested_node(
                replace(existing, cert_serial=_serial(svid), cert_not_after=svid.expires_at.timestamp(),
                        selectors=selectors, updated_at=now, renewed_from=address, renewed_at=now,
                        superseded=superseded, labels=labels),
                expected_revision=existing.revision or None)
        await self._ok(node, "x509pop")
        return Attested(node, svid)


_SUBJECT_OIDS = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
                 "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "C": NameOID.COUNTRY_NAME,
                 "serialNumber": NameOID.SERIAL_NUMBER}


def cert_labels(leaf: x509.Certificate, mappings: Sequence[CertLabel]) -> dict[str, str]:
    """The labels `mappings` take from a node certificate. A mapped value that is absent, or
    not a valid label value, gives no label: a certificate cannot smuggle in odd text."""
    try:
        uris = [str(u) for u in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        uris = []
    out: dict[str, str] = {}
    for m in mappings:
        value: str | None = None
        if m.source == "subject":
            found = leaf.subject.get_attributes_for_oid(_SUBJECT_OIDS[m.argument])
            value = str(found[0].value) if found else None
        else:
            value = next((u[len(m.argument):] for u in uris if u.startswith(m.argument)), None)
        if value is None:
            continue
        try:
            out[m.key] = check_value(m.key, value)
        except LabelError:
            continue
    return out


def _may_sign(leaf: x509.Certificate) -> bool:
    """RFC 5280: without a key usage extension the key is unrestricted; with one, the
    challenge signature needs digitalSignature."""
    try:
        return bool(leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature)
    except x509.ExtensionNotFound:
        return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _proves_possession(leaf: x509.Certificate, message: bytes, signature: bytes) -> bool:
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                       hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True

