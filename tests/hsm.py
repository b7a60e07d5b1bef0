"""A real SoftHSM2 token for the tests, initialised in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "4711-2342"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    tokens: Path
    label: str
    pin_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def server_flags(self, *, signing_ca: bool = False) -> list[str]:
        flags = ["--key-manager", "pkcs11", "--pkcs11-module", str(MODULE), "--pkcs11-token-label", self.label,
                 "--pkcs11-pin-file", str(self.pin_file)]
        return flags + (["--pkcs11-signing-ca"] if signing_ca else [])

    def tool(self, *args: str) -> str:
        """pkcs11-tool (OpenSC), logged in to the token: an independent view of what it holds."""
        out = subprocess.run(["pkcs11-tool", "--module", str(MODULE), "--token-label", self.label, "--login",
                              "--pin", PIN, *args], capture_output=True, text=True, env={**os.environ, **self.env},
                             timeout=30, check=True)
        return out.stdout

    def private_keys(self) -> list[str]:
        """The private key objects' descriptions (one block per key)."""
        text = self.tool("--list-objects", "--type", "privkey")
        return [block for block in text.split("Private Key Object")[1:]]


def make_softhsm(directory: Path, label: str = "trustmesh-ca") -> SoftHsm:
    if not MODULE.exists() or shutil.which("softhsm2-util") is None:
        pytest.fail("SoftHSM2 is not installed; scripts/test installs it (apt-get install softhsm2 opensc)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin",
                    "so-" + PIN], check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return SoftHsm(conf, tokens, label, pin_file)
