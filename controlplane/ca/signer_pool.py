"""X509-SVID signing on worker processes, so issuance uses every core and the event loop only routes.

The signing CA's key reaches a worker only through the executor's pipe, as PKCS#8 DER bytes
inside each task, tagged with a generation number: a worker keeps the last generation it
loaded in memory and reloads when the number moves (a rotated signing CA). Nothing is written
to disk, and workers are started with `spawn`, so they share no memory with the server beyond
what is sent to them. A worker that dies breaks the pool: the pool is recreated and the batch
retried once, then the call fails with UnavailableError rather than hanging.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.errors import CAError, SvidError, TrustmeshError, UnavailableError
from trustmesh.spiffeid import SpiffeId

# One item to sign: CSR DER, SPIFFE ID, NotBefore, NotAfter, DNS names, and the admin entry it
# is issued from ("" for others; x509svid.ADMIN_ENTRY_OID), all checked already except the
# CSR, which is parsed and checked in the worker.
SignItem = tuple[bytes, SpiffeId, datetime, datetime, tuple[str, ...], str]
# What a worker sends back per item: the leaf's DER, or (error kind, message).
SignOutcome = bytes | tuple[str, str]


@dataclass(frozen=True)
class SigningMaterial:
    """The signing CA as bytes, encoded once per generation (not per batch or item)."""

    generation: int
    key_pkcs8_der: bytes
    cert_der: bytes


# --- worker side (runs in the child processes) --------------------------------------------

_worker_state: tuple[int, object, x509.Certificate] | None = None


def _watch_parent(parent: int) -> None:
    # A server killed with SIGKILL cannot shut its pool down; its workers must not outlive it.
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(1.0)


def _init_worker(parent: int) -> None:
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _warm() -> int:
    return os.getpid()


def _sign_chunk(material: SigningMaterial, items: Sequence[SignItem]) -> list[SignOutcome]:
    from trustmesh.keys import load_private_key_pkcs8_der
    from trustmesh.x509svid import build_leaf_certificate, parse_csr

    global _worker_state
    if _worker_state is None or _worker_state[0] != material.generation:
        _worker_state = (material.generation, load_private_key_pkcs8_der(material.key_pkcs8_der),
                         x509.load_der_x509_certificate(material.cert_der))
    _, key, cert = _worker_state
    out: list[SignOutcome] = []
    for csr_der, spiffe_id, not_before, not_after, dns_names, admin_entry in items:
        try:
            csr = parse_csr(csr_der)
            leaf = build_leaf_certificate(
                spiffe_id=spiffe_id, public_key=csr.public_key(), issuer=cert,  # type: ignore[arg-type]
                issuer_key=key, not_before=not_before, not_after=not_after, dns_names=dns_names,  # type: ignore[arg-type]
                admin_entry=admin_entry,
            )
            out.append(leaf.public_bytes(Encoding.DER))
        except SvidError as err:
            out.append(("svid", str(err)))
        except CAError as err:
            out.append(("ca", str(err)))
    return out


# --- server side ----------------------------------------------------------------------------


class SignerPool:
    """A pool of signing processes; batches are split across them and signed in parallel."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise CAError(f"a signing pool needs at least 1 worker, got {workers}")
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    @property
    def workers(self) -> int:
        return self._workers

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise UnavailableError("the signing pool is shut down; the server is stopping")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self._workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(os.getpid(),),
            )
        return self._executor

    def start(self) -> None:
        """Start the workers in the background (they import the crypto library while the
        server goes on starting); nothing waits for them."""
        pool = self._pool()
        for _ in range(self._workers):
            pool.submit(_warm).add_done_callback(_ignore_result)

    def _recreate(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            self._executor = None
            broken.shutdown(wait=False, cancel_futures=True)

    async def sign(self, material: SigningMaterial, items: Sequence[SignItem]) -> list[SignOutcome]:
        """Sign `items` (split in one chunk per worker); outcomes in the same order."""
        if not items:
            return []
        size = -(-len(items) // self._workers)
        chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
        for attempt in (1, 2):
            pool = self._pool()
            try:
                futures = [asyncio.wrap_future(pool.submit(_sign_chunk, material, chunk)) for chunk in chunks]
                parts = await asyncio.gather(*futures)
            except BrokenProcessPool as err:
                self._recreate(pool)
                if attempt == 2:
                    raise UnavailableError("the signing workers died twice in a row; retry the request, "
                                           "and check the server's memory limits and logs") from err
                continue
            return [outcome for part in parts for outcome in part]
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the workers and wait for them to exit (no process is left behind)."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _ignore_result(future: Future[int]) -> None:
    # A warm-up that failed (a worker that died at start) shows up again, and is handled,
    # at the first real batch.
    if not future.cancelled():
        future.exception()


def outcome_error(outcome: tuple[str, str]) -> TrustmeshError:
    kind, message = outcome
    return SvidError(message) if kind == "svid" else CAError(message)


__all__ = ["SignItem", "SignOutcome", "SignerPool", "SigningMaterial", "outcome_error"]
