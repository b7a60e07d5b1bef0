"""The certificate authority: root and JWT keys from the journal, a signing CA per process.

Trust chain: root CA (long-lived, key sealed in the journal) -> this replica's signing CA
(hours, key only in memory) -> leaf X509-SVIDs (minutes to an hour).

A leaf takes ONLY the public key from the CSR: the SPIFFE ID, DNS names, lifetime and
extensions come from the caller (the server's own registration record). CPU-heavy work
runs off the event loop: X509-SVID batches on a pool of signing processes when
`CAConfig.signing_workers` > 0 (see `signer_pool`), everything else in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from trustmesh.bundle import Bundle, JwtAuthority
from trustmesh.clock import Clock, utc_now
from trustmesh.controlplane.ca.journal import (
    CAJournal,
    JwtKeySlot,
    RootSlot,
    SigningCARecord,
    Status,
    jwt_aad,
    root_aad,
)
from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.ca.keymanager import KeyManager
from trustmesh.controlplane.ca.pkcs11 import HsmKey
from trustmesh.controlplane.ca.signer_pool import SignerPool, SigningMaterial, SignItem, outcome_error
from trustmesh.controlplane.ca.upstream import UpstreamAuthority
from trustmesh.errors import CAError, ConflictError, SvidError, TrustmeshError
from trustmesh.files import atomic_write
from trustmesh.jwtsvid import sign_jwt_svid
from trustmesh.keys import (
    KEY_KINDS,
    PrivateKey,
    PublicKey,
    key_id,
    private_key_to_pkcs8_der,
    spki_der,
)
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import (
    MAX_COMMON_NAME,
    X509Svid,
    build_ca_certificate,
    build_leaf_certificate,
    parse_csr,
)

_SAVE_RETRIES = 20
MAX_LEAF_TTL = timedelta(days=366)  # far above any entry's bound; guards date arithmetic

# One leaf to sign: CSR DER, SPIFFE ID, lifetime, DNS names, and optionally the id of the
# admin entry it is issued from (x509svid.ADMIN_ENTRY_OID).
LeafRequest = (tuple[bytes, SpiffeId, timedelta, Sequence[str]]
               | tuple[bytes, SpiffeId, timedelta, Sequence[str], str])


def _leaf_request(item: LeafRequest) -> tuple[bytes, SpiffeId, timedelta, Sequence[str], str]:
    if len(item) == 4:
        return (*item, "")
    return item


class CAStateStore(Protocol):
    async def load_ca_state(self) -> tuple[bytes | None, int]: ...
    async def save_ca_state(self, data: bytes, expected_version: int) -> int: ...


@dataclass(frozen=True)
class CAConfig:
    trust_domain: TrustDomain
    replica_id: str
    root_ttl: timedelta = timedelta(days=365)
    ca_ttl: timedelta = timedelta(hours=24)
    key_kind: str = "ec-p256"
    backdate: timedelta = timedelta(seconds=30)
    signing_workers: int = 0  # processes signing X509-SVID batches; 0 signs in a thread of this process
    jwt_issuer: str | None = None  # the OIDC issuer: JWT-SVIDs carry it as `iss` when set

    def __post_init__(self) -> None:
        # Checked here so a bad setting is one clear error at start, not a failure deep in
        # key generation or a CA whose certificates end before they begin.
        if self.key_kind not in KEY_KINDS:
            raise CAError(f"CA key kind {self.key_kind!r} is not supported; use one of {', '.join(KEY_KINDS)}")
        if not self.replica_id:
            raise CAError("the replica id is empty; give each server replica a name")
        for name, ttl in (("root_ttl", self.root_ttl), ("ca_ttl", self.ca_ttl)):
            if ttl <= timedelta(0):
                raise CAError(f"{name} must be positive, got {ttl}")
        if self.backdate < timedelta(0):
            raise CAError(f"backdate must not be negative, got {self.backdate}")
        if self.signing_workers < 0:
            raise CAError(f"signing_workers must be 0 (sign in a thread) or more, got {self.signing_workers}")


@dataclass(frozen=True)
class SigningCA:
    cert: x509.Certificate
    key: PrivateKey
    root_id: str
    issued_at: datetime  # NotBefore is back-dated; rotation counts from the real issue time
    # Under an upstream authority: the mesh root and the upstream CAs below the bundle's
    # root, which every chain this CA signs must carry (the bundle holds only that root).
    above: tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.cert, *self.above)


def needs_rotation(not_before: datetime, not_after: datetime, now: datetime, fraction: float = 0.5) -> bool:
    """Pure rotation threshold: true once `fraction` of the lifetime has passed."""
    return now >= not_before + (not_after - not_before) * fraction


class CertificateAuthority:
    def __init__(
        self,
        config: CAConfig,
        store: CAStateStore,
        keys: KeyManager,
        clock: Clock,
        journal: CAJournal,
        version: int,
        upstream: UpstreamAuthority | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._keys = keys
        self._upstream = upstream
        # The verified chain above each upstream-signed root, by root id.
        self._chains: dict[str, tuple[x509.Certificate, ...]] = {}
        self._clock = clock
        self._journal = journal
        self._version = version
        self._root_keys: dict[str, PrivateKey] = {}
        self._jwt_keys: dict[str, PrivateKey] = {}
        self._signing: SigningCA | None = None
        self._partner: SigningCA | None = None
        # The signing CA as the workers receive it, encoded once per rotation.
        self._material: SigningMaterial | None = None
        self._generation = 0
        if config.signing_workers and keys.signing_keys_in_token:
            raise CAError("signing CA keys in the HSM are used by this process only; set --signing-workers 0")
        self._pool = SignerPool(config.signing_workers) if config.signing_workers else None
        # Set whenever the journal changes (here or, via reload, on another replica): the
        # rotation loop wakes on it to follow a new root at once.
        self.changed = asyncio.Event()
        self._unseal_all()

    # --- start-up ------------------------------------------------------------------------

    @classmethod
    async def load_or_create(
        cls,
        config: CAConfig,
        store: CAStateStore,
        keys: KeyManager | KeyEncryptionKey,
        clock: Clock = utc_now,
        upstream: UpstreamAuthority | None = None,
    ) -> CertificateAuthority:
        """Load the CA (wrong KEK or tampered keys: KeyEncryptionError, never a new CA),
        create it on first start, then make this process's signing CA. A KEK alone means
        software keys sealed under it."""
        if isinstance(keys, KeyEncryptionKey):
            keys = KeyManager(keys)
        data, version = await store.load_ca_state()
        if data is None:
            journal = await asyncio.to_thread(_new_journal, config, keys, upstream, clock())
            try:
                version = await store.save_ca_state(journal.to_bytes(), 0)
            except ConflictError:
                # Another replica created the CA first: use theirs.
                data, version = await store.load_ca_state()
                if data is None:
                    raise CAError("CA state vanished while starting; check the store") from None
                journal = CAJournal.from_bytes(data)
        else:
            journal = CAJournal.from_bytes(data)
        if journal.trust_domain != config.trust_domain.name:
            raise CAError(
                f"the store holds the CA of trust domain {journal.trust_domain!r}, not "
                f"{config.trust_domain.name!r}; use --trust-domain {journal.trust_domain} or another store"
            )
        ca = cls(config, store, keys, clock, journal, version, upstream)
        await ca.rotate_signing_ca()
        return ca

    def _unseal_all(self) -> None:
        """Open every sealed key and check that each slot's public half is that key's.

        The AAD ties a sealed key to its slot, but the certificate and public key beside it
        are stored in the clear: without this check anyone who can write to the store could
        put a root of their own in the bundle (a slot with a copied sealed key and their
        certificate) without ever holding the KEK.
        """
        td = self._journal.trust_domain
        root_ids = [slot.id for slot in self._journal.roots]
        kids = [jslot.kid for jslot in self._journal.jwt_keys]
        if len(set(root_ids)) != len(root_ids) or len(set(kids)) != len(kids):
            raise CAError("CA journal is corrupt or was tampered with: two slots share one id")
        for slot in self._journal.roots:
            key = self._root_keys.get(slot.id) or self._keys.open_key(
                slot.sealed_key, root_aad(td, slot.id), f"root {slot.id}")
            try:
                cert = x509.load_der_x509_certificate(slot.cert_der)
                bound = spki_der(cert.public_key()) == spki_der(key.public_key())  # type: ignore[arg-type]
                if bound and not slot.upstream_chain:
                    cert.verify_directly_issued_by(cert)
            except (ValueError, TypeError, InvalidSignature):
                bound = False
            if not bound:
                raise CAError(f"CA journal was tampered with: the certificate of root {slot.id} is not the "
                              "self-signed certificate of its sealed key; restore the store from a backup")
            if slot.upstream_chain:
                self._upstream_chain(slot.id, cert, slot.upstream_chain)
            self._root_keys[slot.id] = key
        for jslot in self._journal.jwt_keys:
            key = self._jwt_keys.get(jslot.kid) or self._keys.open_key(
                jslot.sealed_key, jwt_aad(td, jslot.kid), f"JWT key {jslot.kid}")
            if jslot.public_key_der != spki_der(key.public_key()) or key_id(key.public_key()) != jslot.kid:
                raise CAError(f"CA journal was tampered with: JWT key {jslot.kid} does not match its sealed key; "
                              "restore the store from a backup")
            self._jwt_keys[jslot.kid] = key
        # Forget keys whose slots were retired (by this or another replica).
        for gone in set(self._root_keys) - set(root_ids):
            del self._root_keys[gone]
            self._chains.pop(gone, None)
        for gone in set(self._jwt_keys) - set(kids):
            del self._jwt_keys[gone]
        # Refuse a journal whose active root is inconsistent before anything is signed.
        self._journal.active_root()
        self._journal.active_jwt_key()

    def _upstream_chain(self, root_id: str, cert: x509.Certificate, stored: bytes) -> tuple[x509.Certificate, ...]:
        """The chain above an upstream-signed root, trusted only when it ends at the root the
        operator configured: the store alone can never add an authority to the bundle."""
        known = self._chains.get(root_id)
        if known is not None:
            return known
        if self._upstream is None:
            raise CAError(f"root {root_id} of the CA is signed by an upstream CA; start every replica with "
                          "--upstream-ca-cert and --upstream-ca-key")
        chain = self._upstream.vouches_for(cert, stored)
        if chain is None:
            raise CAError(f"root {root_id} does not chain to the root in --upstream-ca-cert "
                          f"({self._upstream.root.subject.rfc4514_string()}): the journal was tampered with, or "
                          "the upstream CA changed; restore the store or give the chain the CA was created with")
        self._chains[root_id] = chain
        return chain

    def _chain_above(self, slot: RootSlot) -> tuple[x509.Certificate, ...]:
        """The upstream chain above a root (empty for a self-signed one)."""
        if not slot.upstream_chain:
            return ()
        return self._upstream_chain(slot.id, x509.load_der_x509_certificate(slot.cert_der), slot.upstream_chain)

    async def _update_journal(self, change: Callable[[CAJournal], CAJournal]) -> None:
        """Apply `change` and save with compare-and-swap, re-reading on a lost race."""
        for _ in range(_SAVE_RETRIES):
            new = change(self._journal)
            try:
                self._version = await self._store.save_ca_state(new.to_bytes(), self._version)
                self._journal = new
                self.changed.set()
                return
            except ConflictError:
                await self.reload()
        raise CAError(f"could not save the CA journal after {_SAVE_RETRIES} tries; another writer keeps changing it")

    async def reload(self) -> None:
        """Pick up journal changes (e.g. a root rotation) made by another replica."""
        data, version = await self._store.load_ca_state()
        if data is None:
            raise CAError("CA state disappeared from the store")
        journal = CAJournal.from_bytes(data)
        if version == self._version and journal == self._journal:
            return
        self._journal = journal
        self._version = version
        self._unseal_all()
        self.changed.set()

    # --- signing CA ------------------------------------------------------------------------

    async def rotate_signing_ca(self) -> x509.Certificate:
        """Make a fresh signing CA under the active root and record it in the journal."""
        signing = await self._new_intermediate(self._config.replica_id, "signing CA")
        self._generation += 1
        if self._pool is not None:
            # The workers get the key itself: never with --pkcs11-signing-ca (refused at start).
            self._material = SigningMaterial(self._generation, private_key_to_pkcs8_der(signing.key),
                                             signing.cert.public_bytes(serialization.Encoding.DER))
            if self._generation == 1:
                self._pool.start()
        self._signing = signing
        return signing.cert

    def close(self) -> None:
        """Stop the signing workers, if any (waits for them to exit)."""
        if self._pool is not None:
            self._pool.close()

    async def _new_intermediate(self, holder: str, role: str) -> SigningCA:
        """An intermediate CA under the active root, its key in memory only; recorded in the
        journal (certificate only) so that retiring a root waits for it to expire."""
        root_slot = self._journal.active_root()
        root_cert = x509.load_der_x509_certificate(root_slot.cert_der)
        root_key = self._root_keys[root_slot.id]
        now = self._clock()
        if root_cert.not_valid_after_utc <= now:
            raise CAError(
                f"the active root CA {root_slot.id} expired at {root_cert.not_valid_after_utc.isoformat()}; "
                f"no {role} can be made under it until the root is rotated"
            )
        not_after = min(now + self._config.ca_ttl, root_cert.not_valid_after_utc)

        def build() -> tuple[x509.Certificate, PrivateKey]:
            key = self._keys.new_signing_key(self._config.key_kind, f"trustmesh {role} {self._config.replica_id}")
            cert = build_ca_certificate(
                trust_domain=self._config.trust_domain, public_key=key.public_key(), issuer=root_cert,
                issuer_key=root_key, not_before=now - self._config.backdate, not_after=not_after,
                path_length=0, common_name=_common_name(f"trustmesh {role} {self._config.replica_id}"),
            )
            return cert, key

        cert, key = await asyncio.to_thread(build)
        record = SigningCARecord(
            replica_id=holder, cert_der=cert.public_bytes(serialization.Encoding.DER),
            root_id=root_slot.id, created_at=now.timestamp(), not_after=not_after.timestamp(),
        )
        await self._update_journal(lambda j: j.with_signing_ca(record, now=now.timestamp()))
        upstream = self._chain_above(root_slot)
        above = (root_cert, *upstream[:-1]) if upstream else ()
        return SigningCA(cert, key, root_slot.id, now, above)

    # --- partner certificates ----------------------------------------------------------------

    async def sign_partner_certificate(self, csr_der: bytes, spiffe_id: SpiffeId, ttl: timedelta) -> X509Svid:
        """A certificate for a partner without a SPIFFE system of its own, from its CSR.

        Signed by a partner CA kept apart from the signing CA that serves agents (its own
        key, its own record in the journal), made on first use and replaced at half-life
        or when the root has moved on.
        """
        partner = self._partner
        now = self._clock()
        if (partner is None or partner.root_id != self._journal.active_root().id
                or needs_rotation(partner.issued_at, partner.cert.not_valid_after_utc, now)):
            partner = self._partner = await self._new_intermediate(f"{self._config.replica_id}/partners", "partner CA")

        def sign() -> X509Svid:
            csr = parse_csr(csr_der)
            self._check_id(spiffe_id)
            not_after = min(now + ttl, partner.cert.not_valid_after_utc)
            leaf = build_leaf_certificate(
                spiffe_id=spiffe_id, public_key=csr.public_key(), issuer=partner.cert,  # type: ignore[arg-type]
                issuer_key=partner.key, not_before=now - self._config.backdate, not_after=not_after, dns_names=(),
            )
            return X509Svid(spiffe_id, (leaf, *partner.chain))

        return await asyncio.to_thread(sign)

    # --- root rotation ---------------------------------------------------------------------

    @property
    def journal(self) -> CAJournal:
        return self._journal

    @property
    def signing_root_id(self) -> str:
        """The root this replica's signing CA chains to (differs from the active root right
        after another replica activated a new one, until this replica rotates)."""
        if self._signing is None:
            raise CAError("the signing CA is not ready")
        return self._signing.root_id

    async def prepare_root(self) -> RootSlot:
        """Make a new root and JWT key and publish them in the bundle; nothing signs with
        them until `activate_root`, so every agent and partner can learn them first."""
        self._journal.check_can_prepare()
        now = self._clock()
        root_slot, root_key, jwt_slot, jwt_key = await asyncio.to_thread(
            _new_authorities, self._config, self._keys, self._upstream, now, "prepared")
        await self._update_journal(lambda j: j.with_prepared(root_slot, jwt_slot))
        # After the save: a lost race reloads the journal, which forgets keys it lacks.
        self._root_keys[root_slot.id] = root_key
        self._jwt_keys[jwt_slot.kid] = jwt_key
        return root_slot

    async def activate_root(self) -> RootSlot:
        """The prepared root becomes active; this replica's signing CA moves under it now
        (the others follow as soon as their change feed shows the journal)."""
        now = self._clock().timestamp()
        await self._update_journal(lambda j: j.activated(now))
        await self.rotate_signing_ca()
        return self._journal.active_root()

    async def retire_old(self, max_token_ttl: timedelta) -> tuple[list[str], list[str]]:
        """Drop old roots and JWT keys that nothing valid depends on; (root ids, kids) dropped."""
        now = self._clock().timestamp()
        ttl = max_token_ttl.total_seconds()
        roots = [r.id for r in self._journal.retirable_roots(now)]
        kids = [k.kid for k in self._journal.retirable_jwt_keys(now, ttl)]
        if roots or kids:
            await self._update_journal(lambda j: j.retired(now, ttl))
            for root_id in roots:
                self._root_keys.pop(root_id, None)
            for kid in kids:
                self._jwt_keys.pop(kid, None)
        return roots, kids

    def needs_signing_ca_rotation(self, now: datetime | None = None) -> bool:
        # Half of the lifetime from issue, not from the back-dated NotBefore: with a short
        # --ca-ttl the back-dating would otherwise put every new CA past its half-life.
        if self._signing is None:
            raise CAError("the signing CA is not ready")
        if self._keys.lost(self._signing.key):  # its HSM session ended: it can sign no more
            return True
        return needs_rotation(self._signing.issued_at, self._signing.cert.not_valid_after_utc, now or self._clock())

    @property
    def signing_ca(self) -> x509.Certificate:
        if self._signing is None:
            raise CAError("the signing CA is not ready")
        return self._signing.cert

    @property
    def root(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self._journal.active_root().cert_der)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._config.trust_domain

    # --- issuance ---------------------------------------------------------------------------

    def _check_id(self, spiffe_id: SpiffeId) -> None:
        if spiffe_id.trust_domain != self._config.trust_domain:
            raise CAError(f"{spiffe_id} is outside trust domain {self._config.trust_domain}; "
                          "this CA signs only its own")
        if spiffe_id.is_trust_domain_id:
            raise CAError(f"{spiffe_id} has no path; an X509-SVID names a workload")

    def _leaf_window(self, signing: SigningCA | None, spiffe_id: SpiffeId, ttl: timedelta,
                     now: datetime) -> tuple[SigningCA, datetime, datetime]:
        """Check a leaf request against the CA's rules; (signing CA, NotBefore, NotAfter)."""
        self._check_id(spiffe_id)
        if ttl <= timedelta(0):
            raise CAError(f"lifetime must be positive, got {ttl}")
        if ttl > MAX_LEAF_TTL:
            raise CAError(f"lifetime {ttl} is longer than the {MAX_LEAF_TTL.days} days a leaf may live")
        if signing is None:
            raise CAError("the signing CA is not ready")
        not_after = min(now + ttl, signing.cert.not_valid_after_utc)
        if not_after <= now:
            raise CAError("the signing CA has expired; it must be rotated before issuing")
        return signing, now - self._config.backdate, not_after

    def _sign_leaf(self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: timedelta,
                   dns_names: Sequence[str], admin_entry: str = "") -> X509Svid:
        signing, not_before, not_after = self._leaf_window(self._signing, spiffe_id, ttl, self._clock())
        leaf = build_leaf_certificate(
            spiffe_id=spiffe_id, public_key=public_key, issuer=signing.cert, issuer_key=signing.key,
            not_before=not_before, not_after=not_after, dns_names=tuple(dns_names), admin_entry=admin_entry,
        )
        return X509Svid(spiffe_id, (leaf, *signing.chain))

    def _sign_csr(self, csr_der: bytes, spiffe_id: SpiffeId, ttl: timedelta, dns_names: Sequence[str],
                  admin_entry: str = "") -> X509Svid:
        csr = parse_csr(csr_der)
        return self._sign_leaf(csr.public_key(), spiffe_id, ttl, dns_names, admin_entry)  # type: ignore[arg-type]

    async def sign_x509_svid(self, csr_der: bytes, spiffe_id: SpiffeId, ttl: timedelta,
                             dns_names: Sequence[str] = ()) -> X509Svid:
        if self._pool is not None:
            (outcome,) = await self.sign_x509_svids([(csr_der, spiffe_id, ttl, dns_names)])
            if isinstance(outcome, TrustmeshError):
                raise outcome
            return outcome
        return await asyncio.to_thread(self._sign_csr, csr_der, spiffe_id, ttl, dns_names)

    async def sign_x509_svids(self, batch: Sequence[LeafRequest]) -> list[X509Svid | TrustmeshError]:
        """Sign a whole batch in one hop (to the signing processes, or a thread); a bad item
        fails alone. A pool whose workers keep dying raises UnavailableError."""
        if self._pool is not None:
            return await self._sign_on_pool(self._pool, batch)

        def run() -> list[X509Svid | TrustmeshError]:
            out: list[X509Svid | TrustmeshError] = []
            for item in batch:
                csr_der, spiffe_id, ttl, dns, admin_entry = _leaf_request(item)
                try:
                    out.append(self._sign_csr(csr_der, spiffe_id, ttl, dns, admin_entry))
                except (SvidError, CAError) as err:
                    out.append(err)
            return out

        return await asyncio.to_thread(run)

    async def _sign_on_pool(self, pool: SignerPool, batch: Sequence[LeafRequest]) -> list[X509Svid | TrustmeshError]:
        # The checks that need no CSR run here; the workers parse the CSRs and sign. The
        # signing CA is taken once, so every leaf of the batch chains to the one that signed it.
        signing, material, now = self._signing, self._material, self._clock()
        out: list[X509Svid | TrustmeshError] = []
        work: list[int] = []
        items: list[SignItem] = []
        for request in batch:
            csr_der, spiffe_id, ttl, dns, admin_entry = _leaf_request(request)
            try:
                _, not_before, not_after = self._leaf_window(signing, spiffe_id, ttl, now)
            except CAError as err:
                out.append(err)
                continue
            if isinstance(dns, str):
                out.append(SvidError("dns_names must be a sequence of names, not one string"))
                continue
            work.append(len(out))
            out.append(_NOT_SIGNED)
            items.append((csr_der, spiffe_id, not_before, not_after, tuple(dns), admin_entry))
        if not items:
            return out
        assert signing is not None and material is not None  # _leaf_window refused the batch otherwise
        outcomes = await pool.sign(material, items)
        above = tuple(c.public_bytes(serialization.Encoding.DER) for c in signing.above)
        for index, item, outcome in zip(work, items, outcomes, strict=True):
            if isinstance(outcome, bytes):
                out[index] = _issued(item[1], (x509.load_der_x509_certificate(outcome), *signing.chain),
                                     (outcome, material.cert_der, *above))
            else:
                out[index] = outcome_error(outcome)
        return out

    async def sign_public_key(self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: timedelta,
                              dns_names: Sequence[str] = ()) -> X509Svid:
        """For the server's own serving SVID, whose key this process made itself."""
        return await asyncio.to_thread(self._sign_leaf, public_key, spiffe_id, ttl, dns_names)

    async def issue_jwt_svid(self, spiffe_id: SpiffeId, audiences: Sequence[str],
                             ttl: timedelta) -> tuple[str, datetime]:
        """`sign_jwt_svid` off the event loop when the key is in an HSM (a network HSM takes
        milliseconds); a software key signs in microseconds, less than a thread hop."""
        if isinstance(self._jwt_keys.get(self._journal.active_jwt_key().kid), HsmKey):
            return await asyncio.to_thread(self.sign_jwt_svid, spiffe_id, audiences, ttl)
        return self.sign_jwt_svid(spiffe_id, audiences, ttl)

    def sign_jwt_svid(self, spiffe_id: SpiffeId, audiences: Sequence[str], ttl: timedelta) -> tuple[str, datetime]:
        self._check_id(spiffe_id)
        slot = self._journal.active_jwt_key()
        now = self._clock().replace(microsecond=0)
        expires = now + ttl
        issuer = {"iss": self._config.jwt_issuer} if self._config.jwt_issuer else None
        token = sign_jwt_svid(spiffe_id=spiffe_id, audiences=list(audiences), private_key=self._jwt_keys[slot.kid],
                              key_id=slot.kid, expires_at=expires, issued_at=now, extra_claims=issuer)
        return token, expires

    # --- the trust bundle -----------------------------------------------------------------

    def x509_authorities(self) -> list[x509.Certificate]:
        """Every root an SVID may still chain to: prepared, active and unexpired old ones.
        A root signed by an upstream CA is represented by that CA's root (once)."""
        now = self._clock().timestamp()
        out: list[x509.Certificate] = []
        for slot in self._journal.roots:
            if slot.not_after <= now:
                continue
            chain = self._chain_above(slot)
            cert = chain[-1] if chain else x509.load_der_x509_certificate(slot.cert_der)
            if cert not in out:
                out.append(cert)
        return out

    def jwt_authorities(self) -> dict[str, PublicKey]:
        now = self._clock().timestamp()
        return {k.kid: self._jwt_keys[k.kid].public_key() for k in self._journal.jwt_keys
                if k.not_after > now}

    def bundle(self) -> Bundle:
        now = self._clock().timestamp()
        jwt = tuple(
            JwtAuthority(k.kid, self._jwt_keys[k.kid].public_key(),
                         datetime.fromtimestamp(k.not_after, timezone.utc))
            for k in self._journal.jwt_keys if k.not_after > now
        )
        return Bundle(self._config.trust_domain, tuple(self.x509_authorities()), jwt,
                      sequence_number=self._version, refresh_hint=timedelta(minutes=5))

    def write_bundle_pem(self, path: Path) -> None:
        """Atomically (temp file + rename) write the roots as PEM, mode 0644."""
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, 0o644)


def _issued(spiffe_id: SpiffeId, chain: tuple[x509.Certificate, ...], ders: tuple[bytes, ...]) -> X509Svid:
    """An X509Svid for a leaf a worker built for exactly `spiffe_id` under our signing CA.

    The checks of `X509Svid.__post_init__` (the leaf's URI SAN is this ID) hold by
    construction here; re-parsing every leaf would cost the event loop about 30 µs an SVID.
    """
    svid = object.__new__(X509Svid)
    object.__setattr__(svid, "spiffe_id", spiffe_id)
    object.__setattr__(svid, "cert_chain", chain)
    object.__setattr__(svid, "private_key", None)
    object.__setattr__(svid, "_ders", ders)  # the bytes the worker signed and the CA's, encoded once
    return svid


# Holds a batch slot until its worker's outcome replaces it.
_NOT_SIGNED = CAError("not signed")


def _common_name(text: str) -> str:
    # A CN is informational here (identity is in the URI SAN) but X.509 caps it at 64
    # characters; a long host name or trust domain must not stop the CA from starting.
    # The hash suffix keeps two long replica names that share a prefix distinct.
    if len(text) <= MAX_COMMON_NAME:
        return text
    return text[: MAX_COMMON_NAME - 9] + "~" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _new_authorities(config: CAConfig, keys: KeyManager, upstream: UpstreamAuthority | None, now: datetime,
                     status: Status) -> tuple[RootSlot, PrivateKey, JwtKeySlot, PrivateKey]:
    """A new root (self-signed, or signed by the upstream CA) and JWT key, made by the key
    manager (sealed under the KEK, or in the HSM) for their slots."""
    td = config.trust_domain
    root_id = secrets.token_hex(8)
    root_key = keys.generate(config.key_kind, f"trustmesh root {root_id}")
    not_after = now + config.root_ttl
    common_name = _common_name(f"trustmesh root CA {td.name} {root_id[:8]}")
    if upstream is None:
        root = build_ca_certificate(
            trust_domain=td, public_key=root_key.public_key(), issuer=None, issuer_key=root_key,
            not_before=now - config.backdate, not_after=not_after, path_length=1, common_name=common_name,
        )
    else:
        root = upstream.sign_root(trust_domain=td, public_key=root_key.public_key(),
                                  not_before=now - config.backdate, not_after=not_after, common_name=common_name)
        not_after = root.not_valid_after_utc
    # The kid is the key's own hash, known only once the key exists; the reference's MAC
    # binds it to the slot as the AAD binds a sealed key.
    jwt_key = keys.generate("ec-p256", f"trustmesh jwt {root_id}")
    kid = key_id(jwt_key.public_key())
    activated = now.timestamp() if status == "active" else 0.0
    root_slot = RootSlot(
        id=root_id, status=status, cert_der=root.public_bytes(serialization.Encoding.DER),
        sealed_key=keys.stored_form(root_key, root_aad(td.name, root_id)), created_at=now.timestamp(),
        not_after=not_after.timestamp(), activated_at=activated,
        upstream_chain=upstream.chain_der if upstream is not None else b"",
    )
    jwt_slot = JwtKeySlot(
        kid=kid, status=status, public_key_der=spki_der(jwt_key.public_key()),
        sealed_key=keys.stored_form(jwt_key, jwt_aad(td.name, kid)),
        created_at=now.timestamp(), not_after=not_after.timestamp(), activated_at=activated,
    )
    return root_slot, root_key, jwt_slot, jwt_key


def _new_journal(config: CAConfig, keys: KeyManager, upstream: UpstreamAuthority | None,
                 now: datetime) -> CAJournal:
    root_slot, _, jwt_slot, _ = _new_authorities(config, keys, upstream, now, "active")
    return CAJournal(trust_domain=config.trust_domain.name, roots=(root_slot,), jwt_keys=(jwt_slot,))


__all__ = ["CAConfig", "CAStateStore", "CertificateAuthority", "SigningCA", "needs_rotation"]
