"""CA keys in an HSM, through PKCS#11 (python-pkcs11).

The root and JWT keys (and, with --pkcs11-signing-ca, each signing CA's key) are generated
inside the token, sensitive and never extractable; this process only ever holds a handle
and the public half. A key is used through `HsmKey`, a `cryptography` EC private key whose
only working operation is `sign`: the certificate builder, the JWS signer and the checks
that take a `PrivateKey` all accept it unchanged, and asking it for its private bytes fails.

Where a software key's journal slot holds the key sealed under the KEK, an HSM key's slot
holds a reference (the object's CKA_ID) with a MAC under a key derived from the KEK over the
slot's associated data. A store writer can therefore neither point a slot at another key of
the token (say, the JWT slot at the root key) nor invent references; the public half is
checked against the slot's certificate as for software keys.

All calls to the token go through one logged-in session under one lock. PKCS#11 allows at
most one operation per session at a time, and SoftHSM2 corrupted its heap when two sessions
signed from two threads at once (seen here): one session, serialised, is the safe form, and
a software token signs in about 70 µs. A token that goes away (unplugged, restarted, the
network HSM unreachable) makes calls fail with UnavailableError naming the token, while the
session is opened again on the next call (at most once a second, then backing off to 30 s);
nothing ever falls back to a software key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import pkcs11
import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from trustmesh.errors import CAError, UnavailableError
from trustmesh.files import PrivateFileError, read_private_file
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.hsm")

T = TypeVar("T")

REF_MAGIC = b"TMP11"
_CURVES = {"ec-p256": ("secp256r1", ec.SECP256R1), "ec-p384": ("secp384r1", ec.SECP384R1)}
_MAX_PIN_FILE = 1024
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0

# Errors after which the session is gone or unusable: open it again and retry once. SoftHSM2
# answers ObjectHandleInvalid when its token directory went away under an open session.
_LOST = (p11err.TokenNotPresent, p11err.TokenNotRecognised, p11err.DeviceRemoved, p11err.DeviceError,
         p11err.SessionHandleInvalid, p11err.SessionClosed, p11err.UserNotLoggedIn, p11err.GeneralError,
         p11err.DeviceMemory, p11err.NoSuchToken, p11err.SlotIDInvalid, p11err.ObjectHandleInvalid,
         p11err.KeyHandleInvalid)


class HsmUnavailableError(UnavailableError):
    """The token cannot be reached now; the call may be tried again later."""


def read_pin(path: Path) -> str:
    try:
        data = read_private_file(path, "--pkcs11-pin-file", limit=_MAX_PIN_FILE, group_may_read=False)
    except PrivateFileError as err:
        raise CAError(str(err)) from err
    pin = data.decode("utf-8", "replace").strip()
    if not pin or "\n" in pin:
        raise CAError(f"--pkcs11-pin-file {path} must hold the token's user PIN on one line")
    return pin


class Pkcs11Token:
    """One logged-in session to a token, shared under a lock, reopened when lost."""

    def __init__(self, module: Path, label: str, pin: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.module, self.label = module, label
        self._pin = pin
        self._clock = clock
        self._lock = threading.Lock()
        self._session: Any = None
        self._handles: dict[tuple[bytes, ObjectClass], Any] = {}
        # Counts sessions opened: objects made in a session (signing CA keys) die with it.
        self.generation = 0
        self._retry_at = 0.0
        self._retry_wait = _RETRY_FIRST
        self._lost_since = 0.0
        try:
            self._lib = pkcs11.lib(str(module))
        except (RuntimeError, OSError, p11err.PKCS11Error) as err:
            raise CAError(f"cannot load the PKCS#11 module --pkcs11-module {module}: {err}; give the HSM "
                          "vendor's library (for SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)") from err
        with self._lock:
            try:
                self._open(first=True)
            except p11err.PKCS11Error as err:
                raise CAError(f"cannot open token {label!r} in {module}: {type(err).__name__}; check the "
                              "module, the token and its PIN") from err

    def __repr__(self) -> str:
        return f"Pkcs11Token(module={str(self.module)!r}, label={self.label!r})"

    def _open(self, *, first: bool = False) -> None:
        """Open and log in a session; at start every failure is a precise CAError."""
        self._close_session()
        try:
            token = self._lib.get_token(token_label=self.label)
        except p11err.NoSuchToken as err:
            if not first:
                raise
            raise CAError(f"no token labelled {self.label!r} in {self.module}; list the tokens with "
                          f"`pkcs11-tool --module {self.module} --list-slots` (SoftHSM2: "
                          "`softhsm2-util --show-slots`)") from err
        except p11err.MultipleTokensReturned as err:
            raise CAError(f"more than one token is labelled {self.label!r} in {self.module}; "
                          "give each token a unique label") from err
        try:
            try:
                self._session = token.open(user_pin=self._pin, rw=True)
            except p11err.UserAlreadyLoggedIn:  # another session of this process kept the login
                self._session = token.open(rw=True)
        except (p11err.PinIncorrect, p11err.PinInvalid, p11err.PinLenRange) as err:
            raise CAError(f"the PIN in --pkcs11-pin-file was refused by token {self.label!r}; "
                          "check the file (several wrong PINs lock the token)") from err
        except p11err.PinLocked as err:
            raise CAError(f"token {self.label!r} is locked after wrong PINs; its security officer must "
                          "unlock it") from err
        self.generation += 1

    def _close_session(self) -> None:
        self._handles.clear()
        if self._session is not None:
            try:
                self._session.close()
            except p11err.PKCS11Error:
                pass  # the session is gone already: that is why it is being replaced
            self._session = None

    def close(self) -> None:
        with self._lock:
            self._close_session()

    def run(self, what: str, call: Callable[[Any], T]) -> T:
        """`call(session)` under the lock; a lost session is opened again and the call retried once."""
        with self._lock:
            for attempt in (1, 2):
                if self._session is None:
                    self._reconnect(what)
                try:
                    result = call(self._session)
                except _LOST as err:
                    self._mark_lost(what, err)
                    if attempt == 2:
                        raise self._unavailable(what, err) from err
                    continue
                except p11err.PKCS11Error as err:
                    raise CAError(f"HSM token {self.label!r} refused to {what}: {type(err).__name__}") from err
                if self._lost_since:
                    log_event(log, "hsm_recovered", token=self.label, outage_seconds=round(
                        self._clock() - self._lost_since, 1))
                    self._lost_since, self._retry_wait = 0.0, _RETRY_FIRST
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _mark_lost(self, what: str, err: Exception) -> None:
        if not self._lost_since:
            self._lost_since = self._clock()
            log_event(log, "hsm_unavailable", level=logging.ERROR, token=self.label, during=what,
                      error=type(err).__name__)
        self._close_session()

    def _reconnect(self, what: str) -> None:
        now = self._clock()
        if now < self._retry_at:
            raise HsmUnavailableError(
                f"HSM token {self.label!r} is unavailable (cannot {what}); trustmesh tries it again in "
                f"{self._retry_at - now:.0f}s — check the device and --pkcs11-module")
        try:
            # Start the library afresh: after a device was removed, or a network HSM's client
            # lost its server, some modules (SoftHSM2 among them) open no new session until
            # then. Every session of this process is being replaced anyway.
            self._lib.reinitialize()
            self._open()
        except (p11err.PKCS11Error, CAError) as err:
            self._retry_at = now + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, _RETRY_MAX)
            raise self._unavailable(what, err) from err
        self._retry_at, self._retry_wait = 0.0, _RETRY_FIRST

    def _unavailable(self, what: str, err: Exception) -> HsmUnavailableError:
        detail = str(err) if isinstance(err, CAError) else type(err).__name__
        return HsmUnavailableError(f"HSM token {self.label!r} is unavailable (cannot {what}: {detail}); "
                                   "check the device and --pkcs11-module; trustmesh keeps retrying")

    def handle(self, session: Any, object_id: bytes, object_class: ObjectClass) -> Any:
        """The object with CKA_ID `object_id` (cached for this session)."""
        key = (object_id, object_class)
        found = self._handles.get(key)
        if found is None:
            try:
                found = session.get_key(object_class=object_class, id=object_id)
            except p11err.NoSuchKey as err:
                raise CAError(f"token {self.label!r} holds no {object_class.name.lower().replace('_', ' ')} "
                              f"with id {object_id.hex()}; was the token re-initialised or the key "
                              "deleted? Restore the token from its backup") from err
            except p11err.MultipleObjectsReturned as err:
                raise CAError(f"token {self.label!r} holds several objects with id {object_id.hex()}; "
                              "ids must be unique") from err
            self._handles[key] = found
        return found

    # --- keys ------------------------------------------------------------------------------

    def generate(self, kind: str, label: str, *, persistent: bool) -> HsmKey:
        """A new EC key pair in the token: sensitive, never extractable, signing only.
        `persistent` False makes session objects, gone when the session ends."""
        if kind not in _CURVES:
            raise CAError(f"CA key kind {kind!r} cannot be kept in the HSM; use ec-p256 or ec-p384")
        curve_name = _CURVES[kind][0]
        object_id = secrets.token_bytes(16)

        def make(session: Any) -> bytes:
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve_name)}, local=True)
            public, _private = params.generate_keypair(
                store=persistent, id=object_id, label=label[:64],
                public_template={Attribute.VERIFY: True},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                  Attribute.PRIVATE: True, Attribute.DERIVE: False, Attribute.DECRYPT: False,
                                  Attribute.UNWRAP: False})
            return bytes(encode_ec_public_key(public))

        spki = self.run("generate a key", make)
        return HsmKey(self, object_id, _public_key(spki), self.generation if not persistent else 0)

    def key(self, object_id: bytes) -> HsmKey:
        """An existing private key, checked to be one that can never leave the token."""

        def find(session: Any) -> bytes:
            private = self.handle(session, object_id, ObjectClass.PRIVATE_KEY)
            safe = private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]
            if not safe or private[Attribute.KEY_TYPE] != KeyType.EC:
                raise CAError(f"key {object_id.hex()} in token {self.label!r} is not a sensitive, non-extractable "
                              "EC key; trustmesh uses only keys that cannot leave the HSM")
            public = self.handle(session, object_id, ObjectClass.PUBLIC_KEY)
            return bytes(encode_ec_public_key(public))

        return HsmKey(self, object_id, _public_key(self.run("find a key", find)), 0)

    def find_by_uri(self, uri: str) -> HsmKey:
        """The private key a PKCS#11 URI (RFC 7512) names by `object=` (label) or `id=`."""
        attrs = parse_pkcs11_uri(uri)
        if attrs.get("token", self.label.encode()) != self.label.encode():
            raise CAError(f"{uri}: the key must be in the --pkcs11-token-label token {self.label!r}")

        def find(session: Any) -> bytes:
            query: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY}
            if "id" in attrs:
                query["id"] = attrs["id"]
            if "object" in attrs:
                query["label"] = attrs["object"].decode()
            try:
                private = session.get_key(**query)
            except p11err.NoSuchKey as err:
                raise CAError(f"token {self.label!r} holds no private key matching {uri}") from err
            except p11err.MultipleObjectsReturned as err:
                raise CAError(f"several private keys in token {self.label!r} match {uri}; add id=") from err
            return bytes(private[Attribute.ID])

        return self.key(self.run("find a key", find))

    def sign_digest(self, object_id: bytes, digest: bytes) -> bytes:
        """Raw ECDSA (r || s) over a digest made here: CKM_ECDSA is the mechanism every HSM has."""
        return bytes(self.run("sign", lambda s: self.handle(s, object_id, ObjectClass.PRIVATE_KEY).sign(
            digest, mechanism=Mechanism.ECDSA)))


def _public_key(spki: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(spki)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CAError("the HSM returned a public key that is not an EC key")
    return key


def parse_pkcs11_uri(uri: str) -> dict[str, bytes]:
    """The path attributes of an RFC 7512 PKCS#11 URI we use: object, id, token."""
    if not uri.startswith("pkcs11:"):
        raise CAError(f"{uri!r} is not a PKCS#11 URI (pkcs11:object=LABEL or pkcs11:id=%01%02)")
    path = uri[len("pkcs11:"):].split("?", 1)[0]
    attrs: dict[str, bytes] = {}
    for part in filter(None, path.split(";")):
        name, sep, value = part.partition("=")
        if not sep or name not in ("object", "id", "token", "type"):
            raise CAError(f"{uri}: attribute {name!r} is not supported; use object=, id= and token=")
        attrs[name] = unquote_to_bytes(value)  # id is binary; object and token are UTF-8 text
        if name != "id":
            try:
                attrs[name].decode()
            except UnicodeDecodeError as err:
                raise CAError(f"{uri}: {name}= is not UTF-8 text") from err
    if "type" in attrs and attrs.pop("type") != b"private":
        raise CAError(f"{uri}: the upstream key must be a private key (type=private)")
    if "object" not in attrs and "id" not in attrs:
        raise CAError(f"{uri}: name the key with object=LABEL or id=%XX")
    return attrs


class HsmKey(ec.EllipticCurvePrivateKey):
    """An EC private key that lives in the token: it signs and does nothing else."""

    def __init__(self, token: Pkcs11Token, object_id: bytes, public: ec.EllipticCurvePublicKey,
                 generation: int) -> None:
        self._token, self.object_id, self._public = token, object_id, public
        # Session objects (a signing CA's key) are bound to the session that made them.
        self._generation = generation

    def __repr__(self) -> str:
        return f"HsmKey(token={self._token.label!r}, id={self.object_id.hex()})"

    @property
    def lost(self) -> bool:
        """True for a session key whose session has ended (the token was reconnected)."""
        return bool(self._generation) and self._generation != self._token.generation

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise CAError("an HSM key signs with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(data)
            digest = hasher.finalize()
        if self.lost:
            raise HsmUnavailableError(f"HSM session key {self.object_id.hex()} ended with its session; "
                                      "the signing CA is being replaced")
        raw = self._token.sign_digest(self.object_id, digest)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise CAError("an HSM CA key signs only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise CAError("an HSM key never leaves the token")

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise CAError("an HSM key never leaves the token")

    def __copy__(self) -> HsmKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HsmKey:
        return self


# --- references in the journal ---------------------------------------------------------------


def is_reference(stored: bytes) -> bool:
    return stored.startswith(REF_MAGIC)


def make_reference(mac_key: bytes, token_label: str, object_id: bytes, aad: bytes) -> bytes:
    body = {"id": object_id.hex(), "token": token_label}
    mac = hmac.new(mac_key, aad + b"|" + object_id, hashlib.sha256).hexdigest()
    return REF_MAGIC + json.dumps({**body, "mac": mac}, sort_keys=True, separators=(",", ":")).encode()


def open_reference(mac_key: bytes, stored: bytes, aad: bytes) -> bytes:
    """The CKA_ID a reference names, once its MAC shows it was made for this slot."""
    try:
        doc = json.loads(stored[len(REF_MAGIC):])
        object_id = bytes.fromhex(doc["id"])
        mac = str(doc["mac"])
    except (ValueError, KeyError, TypeError) as err:
        raise CAError("an HSM key reference in the CA journal is malformed; the journal is corrupt") from err
    expected = hmac.new(mac_key, aad + b"|" + object_id, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        raise CAError("an HSM key reference in the CA journal failed its check: it was modified or moved to "
                      "another slot (or the KEK is not the one the CA was created with); restore the store "
                      "from a backup")
    return object_id


__all__ = ["HsmKey", "HsmUnavailableError", "Pkcs11Token", "is_reference", "make_reference", "open_reference",
           "parse_pkcs11_uri", "read_pin"]
