"""The wheel installs one import root, `trustmesh`: the repository's top-level `controlplane/`
and `agent/` folders become `trustmesh.controlplane` and `trustmesh.agent`, so no other
distribution with a package named `agent` or `controlplane` can break an installation."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_holds_only_the_trustmesh_import_root(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = tmp_path.glob("trustmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert tops == {"trustmesh"}
    # Every package of the source tree is in the wheel under the one root, and nothing twice.
    for folder, package in (("controlplane", "trustmesh/controlplane"), ("agent", "trustmesh/agent")):
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{source.relative_to(ROOT / folder).as_posix()}" in names
    assert len(names) == len(set(names))
    # The web console's pages, scripts, styles and vendored licences are installed with its code.
    static = ROOT / "controlplane" / "console" / "static"
    shipped = (".html", ".css", ".js", ".map", ".png", ".svg", ".txt", ".md")
    for source in (static.rglob("*") if static.is_dir() else ()):
        if source.is_file() and (source.suffix in shipped or "LICENSE" in source.name):
            assert f"trustmesh/controlplane/console/static/{source.relative_to(static).as_posix()}" in names
    assert "trustmesh/_proto/trustmesh/v1/node_pb2.py" in names
    # The policy files' JSON Schema, which `policy lint` reads from the package.
    assert "trustmesh/policy/schemas/policy-v1.json" in names
