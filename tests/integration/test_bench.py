"""`scripts/bench --quick` runs every benchmark at small size and writes well-formed results.

Only the shape is checked (no timing assertions): every benchmark is present and every row
has the fields the README and RESULTS.md rely on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_PREFIXES = ("flows.ingestion", "flows.store_writes.", "flows.idle_reads.", "flows.graph_latency",
                     "flows.simulate_latency", "issuance.sqlite.", "issuance.etcd.", "hsm.issuance.",
                     "propagation.policy.",
                     "propagation.entry.", "idle_load.",
                     "workload_api.first_response", "workload_api.rotation_fanout", "workload_api.agent_rss",
                     "proxy.handshakes", "proxy.bulk", "proxy.cpu_per_1000_requests", "proxy.caller_check",
                     "http_proxy.requests_per_second", "http_proxy.added_p99_ms", "http_proxy.cpu_per_1000_requests",
                     "scale.sync_cost_ratio", "scale.server_rss", "detection.", "quarantine.in_force.",
                     "quarantine.report_to_detected.", "quarantine.report_to_recorded.")


@pytest.mark.slow
@pytest.mark.etcd
def test_quick_benchmarks_write_complete_results(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing; scripts/test installs it, so CI must have it")
        pytest.skip("nginx is not installed (scripts/test installs it)")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"], cwd=ROOT,
                            env={**os.environ, "TRUSTMESH_BENCH_OUT": str(tmp_path)}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "latest.json").read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == {"name", "value", "unit", "reference", "reference_value", "ratio", "goal", "params"}, row
        assert isinstance(row["name"], str) and isinstance(row["unit"], str) and isinstance(row["goal"], str)
        assert isinstance(row["reference"], str) and isinstance(row["params"], dict)
        for number in ("value", "reference_value", "ratio"):
            assert isinstance(row[number], (int, float)) and row[number] == row[number], (row, number)  # not NaN
    names = [r["name"] for r in rows]
    for prefix in EXPECTED_PREFIXES:
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert len(names) == len(set(names))
    assert "| benchmark" in result.stdout, "the table is printed"
