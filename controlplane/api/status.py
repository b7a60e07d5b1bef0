"""The one place that turns errors into gRPC status codes and messages.

Handlers raise trustmesh errors; the call layer (calls.py) answers each call that raised
with the matching code and the error's own message, which is written for a person to act
on. Anything that is not a trustmesh error is a bug: it is logged with its traceback and
answered as INTERNAL without leaking details to the caller.
"""

from __future__ import annotations

import logging

import grpc

from trustmesh.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    InvalidSpiffeIdError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StoreUnavailableError,
    SvidError,
    TrustmeshError,
    UnauthenticatedError,
    UnavailableError,
    VerificationError,
)
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.api")

# The request-level errors live in trustmesh.errors so transport-free code can raise them
# without importing grpc; they are re-exported here for the servicers.
__all__ = ["FailedPreconditionError", "InvalidArgumentError", "PermissionDeniedError", "UnauthenticatedError",
           "UnavailableError", "status_code_for", "status_for"]


# Most specific first: the first isinstance match wins.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidSpiffeIdError, grpc.StatusCode.INVALID_ARGUMENT),
    (SvidError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (VerificationError, grpc.StatusCode.PERMISSION_DENIED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ConflictError, grpc.StatusCode.ABORTED),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_code_for(err: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def status_for(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a caller gets when `method` raised `err`; logs the bugs among them."""
    if isinstance(err, (TrustmeshError, ValueError)):
        return status_code_for(err), str(err)
    if isinstance(err, NotImplementedError):
        # What the generated servicer base classes raise for a method a servicer leaves out.
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server"
    # The outermost edge of a call: the bug is logged with its traceback for us; the caller
    # gets INTERNAL without internals.
    log.error("unhandled error", exc_info=err, extra={"fields": {"method": method}})
    log_event(log, "internal_error", level=logging.ERROR, method=method, error=type(err).__name__)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log"
