"""The error hierarchy shared by every part of trustmesh.

One root, one subclass per area. Messages are lower case, specific and say what to do.
The mapping to gRPC status codes lives at the API edge, never here.
"""

from __future__ import annotations

from trustmesh.clip import shown


class TrustmeshError(Exception):
    """Root of every error trustmesh raises on purpose."""


class InvalidSpiffeIdError(TrustmeshError, ValueError):
    """A string is not a SPIFFE ID (or trust domain) as the SPIFFE ID standard defines it."""

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"invalid SPIFFE ID {shown(value)}: {reason}")


class SvidError(TrustmeshError):
    """An SVID (X.509 or JWT) could not be built or parsed."""


class VerificationError(TrustmeshError):
    """An SVID or certificate chain failed verification."""


class BundleError(TrustmeshError):
    """A trust bundle could not be parsed or serialised."""


class CAError(TrustmeshError):
    """The certificate authority cannot do what was asked."""


class KeyEncryptionError(CAError):
    """A key-encryption key is missing, malformed or wrong, or a key blob was tampered with."""


class ListenError(TrustmeshError):
    """A listener could not bind its address: in use, not an address of this host, or privileged."""


class LocalPathError(TrustmeshError):
    """A local directory, file or socket named by a flag cannot be created, entered or used."""


class StoreError(TrustmeshError):
    """The store failed; nothing was written."""


class NotFoundError(StoreError):
    """The record asked for does not exist."""


class AlreadyExistsError(StoreError):
    """A record with that key already exists."""


class ConflictError(StoreError):
    """A compare-and-swap precondition failed: someone else changed the record first."""


class StoreUnavailableError(StoreError):
    """The store backend cannot be reached."""


# Request-level refusals, raised by transport-free handlers; controlplane/api/status.py
# maps each to its gRPC status code.


class InvalidArgumentError(TrustmeshError):
    """The request itself is malformed (a field missing, out of range, not parseable)."""


class PermissionDeniedError(TrustmeshError):
    """The caller is known but not allowed to do this."""


class UnauthenticatedError(TrustmeshError):
    """The caller did not prove who it is (no or unusable client certificate)."""


class FailedPreconditionError(TrustmeshError):
    """The system is not in a state where this can be done (e.g. a CA not yet ready)."""


class UnavailableError(TrustmeshError):
    """Try again later."""


class ResourceExhaustedError(TrustmeshError):
    """The caller sent too much, too often (a rate limit): slow down."""
