"""The trustmesh demo, narrated step by step. Run it through `scripts/demo`.

Everything runs on loopback in a temporary directory and is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

TRUST_DOMAIN = "example.org"


class Step:
    """Prints one progress line per step: `[2/4] starting the control plane … done (0.8s)`."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0

    def __call__(self, text: str) -> "Step":
        self.count += 1
        self.text = text
        self.started = time.monotonic()
        print(f"[{self.count}/{self.total}] {text} …", flush=True)
        return self

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        took = time.monotonic() - self.started
        outcome = "done" if exc_type is None else "FAILED"
        print(f"      {outcome} ({took:.1f}s)", flush=True)


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    data_dir = workdir / "server"
    log_path = workdir / "server.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmesh.cli.main", "server", "run",
         "--trust-domain", TRUST_DOMAIN, "--data-dir", str(data_dir), "--bind", "127.0.0.1:0"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the control plane exited early; its log:\n{log_path.read_text()}")
        if "event=ready" in log_path.read_text():
            return proc, data_dir
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the control plane did not become ready in 60s; its log:\n{log_path.read_text()}")


def describe_bundle(path: Path) -> None:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    print(f"      trust bundle {path} holds {len(certs)} root(s):")
    for cert in certs:
        uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ids = uri.get_values_for_type(x509.UniformResourceIdentifier)
        print(f"        subject   {cert.subject.rfc4514_string()}")
        print(f"        SPIFFE ID {', '.join(ids)}")
        print(f"        valid     {cert.not_valid_before_utc:%Y-%m-%d %H:%M} → {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        print(f"        sha256    {cert.fingerprint(hashes.SHA256()).hex()[:32]}…")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the trustmesh demo on loopback.")
    parser.add_argument("--keep", action="store_true", help="leave the control plane running and print how to reach it")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    step = Step(total=3)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with step("starting the control plane (embedded SQLite store)"):
            server, data_dir = start_server(workdir)
            procs.append(server)
        with step("reading the trust bundle agents bootstrap from"):
            describe_bundle(data_dir / "bundle.pem")
        with step("checking that CA keys are encrypted at rest"):
            db = (data_dir / "store.db").read_bytes()
            kek = data_dir / "kek.bin"
            mode = oct(kek.stat().st_mode & 0o777)
            print(f"      key-encryption key {kek} has mode {mode}; no PEM private key in the store: "
                  f"{b'PRIVATE KEY' not in db}")
        if args.keep:
            print(f"\nthe control plane keeps running (pid {server.pid}); its files are in {workdir}")
            print(f"stop it with: kill {server.pid}")
            procs.clear()
        else:
            print("\ndemo finished; everything stopped.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything.")
        return 130
    finally:
        for proc in procs:
            stop(proc)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
