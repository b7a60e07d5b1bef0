"""Concatenated DER certificates: the form the Workload API uses for chains and bundles."""

from __future__ import annotations

from collections.abc import Iterator

from cryptography import x509

MAX_CERTS = 64


def split_der(data: bytes) -> Iterator[bytes]:
    """Split concatenated DER structures by reading each outer tag-length header.

    Raises ValueError on anything that is not a run of complete DER SEQUENCEs.
    """
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30:
            raise ValueError(f"expected a DER SEQUENCE at byte {offset}")
        if offset + 2 > len(data):
            raise ValueError(f"truncated DER header at byte {offset}")
        first = data[offset + 1]
        header = 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise ValueError(f"bad DER length at byte {offset}")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header += count
        end = offset + header + length
        if end > len(data):
            raise ValueError(f"DER structure at byte {offset} is truncated")
        yield data[offset:end]
        offset = end


def load_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse concatenated DER certificates; ValueError if any part is not a certificate."""
    certs = []
    for i, part in enumerate(split_der(data)):
        if i >= MAX_CERTS:
            raise ValueError(f"more than {MAX_CERTS} certificates")
        certs.append(x509.load_der_x509_certificate(part))
    return certs
