"""Run every benchmark, print a table, write results/latest.json (and RESULTS.md on a full run)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import (  # noqa: E402
    detection,
    fleet,
    flows,
    hsm,
    http_proxy,
    issuance,
    proxy,
    quarantine,
    scale,
    workload,
)

BENCHMARKS = [("issuance", issuance.run),
              ("hsm (issuance with the signing key in SoftHSM2 against a software key)", hsm.run),
              ("fleet (propagation, idle load)", fleet.run),
              ("workload api", workload.run), ("proxy", proxy.run),
              ("http_proxy (the agent's HTTP listener against nginx)", http_proxy.run), ("scale", scale.run),
              ("flows (ingestion, store load, 30 days read)", flows.run),
              ("detection (labelled trace: detected, false alerts, replay speed)", detection.run),
              ("quarantine (live: anomalous report to quarantine in force at every agent)", quarantine.run)]
FIELDS = ("name", "value", "unit", "reference", "reference_value", "ratio", "goal", "params")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, {platform.platform()}"


def table(results: list[dict[str, object]]) -> str:
    rows = [("benchmark", "value", "reference", "ratio", "goal")]
    for r in results:
        rows.append((str(r["name"]), f"{r['value']} {r['unit']}", f"{r['reference_value']} ({r['reference']})",
                     str(r["ratio"]), str(r["goal"])))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="run the trustmesh benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this benchmark (issuance, hsm, fleet, workload, proxy, http_proxy, scale, "
                             "flows, detection, quarantine); repeatable")
    args = parser.parse_args()
    results: list[dict[str, object]] = []
    for name, run in BENCHMARKS:
        if args.only and name.split()[0] not in args.only:
            continue
        started = time.monotonic()
        print(f"[bench] {name} …", flush=True)
        results.extend(run(args.quick))
        print(f"[bench] {name} done ({time.monotonic() - started:.0f}s)", flush=True)
    # TRUSTMESH_BENCH_OUT lets the smoke test write elsewhere than the committed results.
    out = Path(os.environ.get("TRUSTMESH_BENCH_OUT", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    if not args.quick and not args.only:  # RESULTS.md holds complete runs only
        (HERE / "RESULTS.md").write_text(
            "# Benchmark results\n\n"
            f"Measured with `scripts/bench` on {time.strftime('%Y-%m-%d')}; machine: {machine()}.\n"
            "Each value is measured against its reference in the same run.\n\n" + text + "\n"
            + ("\n" + (HERE / "analysis.md").read_text() if (HERE / "analysis.md").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
