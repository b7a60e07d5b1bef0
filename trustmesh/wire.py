"""Kernel values on the wire (types.proto), both ways, for the server and the agent alike.

The server encodes and the agent decodes the same messages; one module for both keeps the
two sides from drifting. Compiled policy has its own pair in `trustmesh/policy/wire.py`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_der_public_key

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.bundle import Bundle, JwtAuthority
from trustmesh.keys import spki_der
from trustmesh.selectors import Selector
from trustmesh.spiffeid import TrustDomain


def selector_to_pb(selector: Selector | str) -> types_pb2.Selector:
    sel = selector if isinstance(selector, Selector) else Selector.from_text(selector)
    return types_pb2.Selector(type=sel.type, value=sel.value)


def selector_from_pb(message: types_pb2.Selector) -> Selector:
    """The selector as sent, unchecked: whoever acts on it checks it (`Selector.parse`)."""
    return Selector(message.type, message.value)


def bundle_to_pb(bundle: Bundle) -> types_pb2.Bundle:
    return types_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        x509_authorities=[c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities],
        jwt_authorities=[
            types_pb2.JwtAuthority(
                key_id=a.key_id, public_key=spki_der(a.public_key),
                expires_at=int(a.expires_at.timestamp()) if a.expires_at else 0,
            )
            for a in bundle.jwt_authorities
        ],
        refresh_hint_seconds=int(bundle.refresh_hint.total_seconds()) if bundle.refresh_hint else 0,
        sequence_number=bundle.sequence_number or 0,
    )


def bundle_from_pb(message: types_pb2.Bundle) -> Bundle:
    return Bundle(
        TrustDomain(message.trust_domain),
        tuple(x509.load_der_x509_certificate(d) for d in message.x509_authorities),
        tuple(JwtAuthority(a.key_id, load_der_public_key(a.public_key),  # type: ignore[arg-type]
                           datetime.fromtimestamp(a.expires_at, timezone.utc) if a.expires_at else None)
              for a in message.jwt_authorities),
        sequence_number=message.sequence_number or None,
        refresh_hint=timedelta(seconds=message.refresh_hint_seconds) if message.refresh_hint_seconds else None,
    )
