"""The operator profile: what `trustmesh login` leaves for the admin commands that follow.

One directory ($TRUSTMESH_PROFILE_DIR, default ~/.trustmesh), mode 0700, holding the
operator certificate chain, its private key (made on this machine at login, never sent;
mode 0600), the trust bundle the server was checked against, and profile.json (server
address, operator, expiry). `trustmesh logout` removes them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trustmesh.errors import TrustmeshError
from trustmesh.files import atomic_write

PROFILE_ENV = "TRUSTMESH_PROFILE_DIR"
_FILES = ("profile.json", "operator.pem", "operator-key.pem", "bundle.pem")


class ProfileError(TrustmeshError):
    """The profile cannot be read or written."""


def profile_dir() -> Path:
    return Path(os.environ.get(PROFILE_ENV) or Path.home() / ".trustmesh")


@dataclass(frozen=True)
class Profile:
    directory: Path
    server: str
    operator: str
    spiffe_id: str
    expires_at: float
    roles: tuple[str, ...]

    @property
    def cert(self) -> Path:
        return self.directory / "operator.pem"

    @property
    def key(self) -> Path:
        return self.directory / "operator-key.pem"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time()


def load_profile(directory: Path | None = None) -> Profile | None:
    """The profile of the last login, or None when there is none."""
    directory = directory or profile_dir()
    path = directory / "profile.json"
    try:
        data = json.loads(path.read_text())
        return Profile(directory, str(data["server"]), str(data["operator"]), str(data["spiffe_id"]),
                       float(data["expires_at"]), tuple(str(r) for r in data.get("roles", ())))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProfileError(f"cannot read the operator profile {path} ({err}); `trustmesh logout` clears it") from err


def save_profile(profile: Profile, cert_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
    """Write the profile; the key first, so that no certificate is ever there without it."""
    try:
        profile.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(profile.directory, 0o700)
        atomic_write(profile.key, key_pem, 0o600)
        atomic_write(profile.cert, cert_pem, 0o600)
        atomic_write(profile.bundle, bundle_pem, 0o600)
        atomic_write(profile.directory / "profile.json", json.dumps({
            "server": profile.server, "operator": profile.operator, "spiffe_id": profile.spiffe_id,
            "expires_at": profile.expires_at, "roles": list(profile.roles)}, indent=2).encode() + b"\n", 0o600)
    except OSError as err:
        raise ProfileError(f"cannot write the operator profile in {profile.directory}: {err.strerror}; "
                           f"set {PROFILE_ENV} to a directory you own") from err


def clear_profile(directory: Path | None = None) -> bool:
    """Remove the profile's files; whether there was one."""
    directory = directory or profile_dir()
    found = False
    for name in _FILES:
        try:
            (directory / name).unlink()
            found = True
        except FileNotFoundError:
            continue
        except OSError as err:
            raise ProfileError(f"cannot remove {directory / name}: {err.strerror}") from err
    return found
