"""Where the CA's keys live: sealed under the KEK in the journal, or inside an HSM token.

The journal slot of a root or JWT key holds what `new_key` returned: a key sealed under the
KEK (AES-256-GCM, bound to the slot), or a MAC'd reference to an object in the token
(`pkcs11.make_reference`). `open_key` tells the two apart by their first bytes, so a CA
created with software keys keeps working after the switch to an HSM, until a root rotation
moves it into the token (a warning says so). The reverse is refused: a journal whose keys
are in a token never silently falls back to software keys.
"""

from __future__ import annotations

import logging

from trustmesh.controlplane.ca.kek import KeyEncryptionKey
from trustmesh.controlplane.ca.pkcs11 import HsmKey, Pkcs11Token, is_reference, make_reference, open_reference
from trustmesh.errors import CAError, SvidError
from trustmesh.keys import PrivateKey, generate_private_key, load_private_key_pkcs8_der, private_key_to_pkcs8_der
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.ca")


class KeyManager:
    """Makes, stores and opens CA keys: software (the default) or in a PKCS#11 token."""

    def __init__(self, kek: KeyEncryptionKey, token: Pkcs11Token | None = None, *,
                 signing_keys_in_token: bool = False) -> None:
        if signing_keys_in_token and token is None:
            raise CAError("signing CA keys in the HSM need a PKCS#11 token")
        self._kek = kek
        self.token = token
        self.signing_keys_in_token = signing_keys_in_token
        # References are MAC'd under their own key: the KEK's other uses never see it.
        self._ref_key = kek.derive("pkcs11-key-reference")
        self._warned: set[bytes] = set()

    @property
    def name(self) -> str:
        return "pkcs11" if self.token is not None else "software"

    def generate(self, kind: str, label: str) -> PrivateKey:
        """A new root or JWT key: in the token (kept there), or in memory to be sealed."""
        if self.token is not None:
            return self.token.generate(kind, label, persistent=True)
        return generate_private_key(kind)

    def stored_form(self, key: PrivateKey, aad: bytes) -> bytes:
        """What the key's journal slot holds: a MAC'd reference, or the key sealed under the KEK."""
        if isinstance(key, HsmKey):
            assert self.token is not None  # only a token makes HsmKeys
            return make_reference(self._ref_key, self.token.label, key.object_id, aad)
        return self._kek.seal(private_key_to_pkcs8_der(key), aad)

    def open_key(self, stored: bytes, aad: bytes, what: str) -> PrivateKey:
        if is_reference(stored):
            if self.token is None:
                raise CAError(f"the CA's {what} is in an HSM token; start with --key-manager pkcs11 and its "
                              "--pkcs11-module, --pkcs11-token-label and --pkcs11-pin-file")
            return self.token.key(open_reference(self._ref_key, stored, aad))
        if self.token is not None and stored not in self._warned:
            self._warned.add(stored)
            log_event(log, "ca_key_in_software", level=logging.WARNING, key=what,
                      fix="rotate the root (`trustmesh ca rotate`) to make its successor in the HSM")
        plaintext = self._kek.open(stored, aad)
        try:
            return load_private_key_pkcs8_der(plaintext)
        except SvidError as err:  # authenticated, so sealed by this KEK, yet not a key
            raise CAError("a sealed CA key opened but is not a private key; the journal is corrupt") from err

    def new_signing_key(self, kind: str, label: str) -> PrivateKey:
        """A signing (or partner) CA's key: in memory only, or a session object of the token."""
        if self.signing_keys_in_token and self.token is not None:
            return self.token.generate(kind, label, persistent=False)
        return generate_private_key(kind)

    @staticmethod
    def lost(key: PrivateKey) -> bool:
        """True when a token session key can no longer sign (its session ended)."""
        return isinstance(key, HsmKey) and key.lost

    def close(self) -> None:
        if self.token is not None:
            self.token.close()


__all__ = ["KeyManager"]
