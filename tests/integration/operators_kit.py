"""Operators for integration tests: a person with a profile directory of its own, enrolled
and logged in through the real CLI, with TOTP codes computed from the secret it enrolled with."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pyotp

from tests.integration.harness import ServerProcess, trustmesh_cmd

PASSWORD = "correct horse battery staple"


@dataclass
class Operator:
    """One person: a profile directory of its own and its TOTP secret."""

    name: str
    server: ServerProcess
    admin_bind: str
    login_bind: str
    home: Path
    totp: pyotp.TOTP | None = None
    step: int = 0  # the newest step whose code was used

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TRUSTMESH_ADMIN_SOCKET", "TRUSTMESH_ADMIN_SERVER")}
        env["TRUSTMESH_PROFILE_DIR"] = str(self.home / "profile")
        return subprocess.run(trustmesh_cmd(*args), capture_output=True, text=True, env=env, timeout=60,
                              cwd=self.home)

    def code(self) -> str:
        """A code of a step after the last one used: the server accepts each step once, the
        steps before and after now too, and never an older step after a newer one. So up to
        three codes in a row without waiting (the step before now only while it is not about
        to become two steps old); then it waits for the next step."""
        assert self.totp is not None
        while True:
            clock = time.time()
            now = int(clock) // 30
            low = now - 1 if clock - now * 30 < 20 else now
            for step in range(max(low, self.step + 1), now + 2):
                self.step = step
                return self.totp.at(step * 30)
            time.sleep(max(0.05, (now + 1) * 30 - time.time()))

    def login_flags(self) -> list[str]:
        return ["--server", self.admin_bind, "--login-server", self.login_bind,
                "--trust-bundle", str(self.server.bundle_path), "--password-file", str(self.home / "pw")]

    def enroll(self, token: str) -> None:
        (self.home / "pw").write_text(PASSWORD + "\n")
        result = self.run("operator", "enroll", *self.login_flags(), "--token", token)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("otpauth://totp/"), result.stdout
        parsed = pyotp.parse_uri(lines[0])
        assert isinstance(parsed, pyotp.TOTP) and parsed.digits == 6 and parsed.interval == 30
        self.totp = parsed

    def login(self, otp: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("login", *self.login_flags(), "--operator", self.name, "--otp", otp or self.code())


def add_operator(setup: tuple[ServerProcess, str, str], tmp_path: Path, name: str, *roles: str,
              team: str = "") -> Operator:
    server, admin_bind, login_bind = setup
    home = tmp_path / name
    home.mkdir()
    flags = [arg for role in roles for arg in ("--role", role)] + (["--team", team] if team else [])
    added = server.cli("operator", "add", name, *flags, check=True).stdout.splitlines()
    assert len(added) == 1 and len(added[0]) >= 40  # one line: the token
    assert added[0].startswith("tmen_")  # never "-…", which `--token` would take for a flag
    person = Operator(name, server, admin_bind, login_bind, home)
    person.enroll(added[0])
    return person


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def audit(server: ServerProcess, *flags: str) -> list[dict[str, object]]:
    events: list[dict[str, object]] = json.loads(server.cli("audit", "show", "--json", *flags, check=True).stdout)
    return events
