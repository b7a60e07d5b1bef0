"""`trustmesh detect replay`: a flow trace through exactly the detectors and response rules
the server runs, offline, so a team can tune its Response documents on its own history
(`trustmesh flows export --format jsonl`) before it lets anything be quarantined."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from trustmesh.cli.config import invalid_as
from trustmesh.clock import format_utc
from trustmesh.detect.engine import LEARN_DEFAULT, Alert, Engine, alert_to_dict
from trustmesh.detect.trace import TraceFormatError, TraceRecord, read_trace
from trustmesh.duration import format_duration, parse_duration
from trustmesh.errors import TrustmeshError
from trustmesh.policy import load_paths
from trustmesh.policy.responses import ResponsePolicy

INVALID = 2


class ReplayError(TrustmeshError):
    """The trace or the configuration cannot be replayed; the message says what to fix."""


def _responses(paths: list[str], dry_run: bool) -> ResponsePolicy:
    if not paths:
        return ResponsePolicy(force_dry_run=dry_run)
    loaded = load_paths(paths, reject_expired=False)
    if not loaded.ok:
        first = loaded.problems[0]
        more = f" (and {len(loaded.problems) - 1} more; `trustmesh policy lint` lists them)" \
            if len(loaded.problems) > 1 else ""
        raise ReplayError(f"{first}{more}")
    if not loaded.policy.responses.documents:
        raise ReplayError(f"no `kind: Response` document in {', '.join(paths)}; without --config the built-in "
                          "default applies (alert at score 0.5, never quarantine)")
    return ResponsePolicy(loaded.policy.responses.documents, force_dry_run=dry_run)


def _read(path: str) -> list[TraceRecord]:
    try:
        if path == "-":
            records = list(read_trace(sys.stdin.buffer, "stdin"))
        else:
            with Path(path).open("rb") as lines:
                records = list(read_trace(lines, path))
    except OSError as err:
        raise ReplayError(f"cannot read {path}: {err.strerror or err}") from err
    except TraceFormatError as err:
        raise ReplayError(str(err)) from err
    # In time order, as the server sees them; the sort is stable, so ties keep file order
    # and the same file always gives the same alerts.
    records.sort(key=lambda r: r.ts)
    return records


def _line(alert: Alert) -> str:
    action = "would quarantine" if alert.dry_run else alert.action
    where = f" on {alert.node}" if alert.node else ""
    return (f"{format_utc(alert.ts)}  {action:<16} {alert.detector:<10} {alert.score:.2f}  "
            f"{alert.identity}{where}: {alert.reason}")


def _replay(args: argparse.Namespace) -> int:
    try:
        learn = parse_duration(args.learn).total_seconds()
    except ValueError as err:
        raise ReplayError(f"--learn {args.learn!r}: {err}") from err
    engine = Engine(_responses(args.config or [], args.dry_run), learn=learn)
    records = _read(args.trace)
    # Millions of records live until the end: keep the cyclic collector from walking them
    # again and again while the engine allocates (it was a third of a month's replay).
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    alerts = quarantines = 0
    out = sys.stdout
    for record in records:
        for alert in engine.observe(record):
            alerts += 1
            quarantines += alert.action == "quarantine"
            out.write((json.dumps(alert_to_dict(alert)) if args.json else _line(alert)) + "\n")
    elapsed = time.perf_counter() - started
    if records:
        span = f"{format_utc(records[0].ts)} to {format_utc(records[-1].ts)}"
        rate = f"{len(records) / elapsed:,.0f} records/s" if elapsed > 0 else "instant"
        verb = "would have quarantined" if engine.responses.dry_run else "quarantined"
        print(f"replayed {len(records)} record(s) of {engine.identities()} identities, {span}, learning "
              f"{format_duration(parse_duration(args.learn))} ({rate}): {alerts} alert(s), {verb} {quarantines}",
              file=sys.stderr)
    else:
        print("the trace holds no records", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    detect = commands.add_parser(
        "detect", help="continuous verification offline: replay a flow trace through the detectors",
        description="Continuous verification, offline: feed a flow trace (one flow rollup per line, as "
                    "`trustmesh flows export --format jsonl` writes it) through exactly the baselines, "
                    "detectors and response rules the server runs, and see what they would have said.",
        epilog="example:\n  trustmesh detect replay trace.jsonl --config policies/ --learn 7d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = detect.add_subparsers(dest="detect_command", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser(
        "replay", help="print the alerts a trace raises, one per line",
        description="Replay TRACE (a JSON-lines flow trace, `-` for stdin) in time order through the "
                    "detectors, with the Response documents of --config (files or directories; allowlists in "
                    "them are ignored) or the built-in default (alert at score 0.5, never quarantine). Prints "
                    "one alert per line: time, action, detector, score, identity, node and the explanation; "
                    "with --json one object per line with ts, identity, node, detector, score, action and "
                    "reason. The same trace and configuration always give the same alerts. Exit 0 when the "
                    "replay ran (alerts or not), 2 when the trace or the configuration is invalid.",
        epilog="examples:\n  trustmesh flows export --since 30d --format jsonl > trace.jsonl\n"
               "  trustmesh detect replay trace.jsonl --config policies/ --learn 7d\n"
               "  trustmesh detect replay trace.jsonl --json | jq -r 'select(.action == \"quarantine\")'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("trace", metavar="TRACE.jsonl", help="the flow trace (`-`: standard input)")
    r.add_argument("--config", metavar="FILE", action="append",
                   help="policy files or directories holding `kind: Response` documents (repeatable)")
    r.add_argument("--learn", default=format_duration(parse_duration(int(LEARN_DEFAULT))), metavar="DURATION",
                   help="how long each identity is learned before its baseline detectors fire and anything can "
                        "be quarantined (default 7d, as the server's --learn)")
    r.add_argument("--dry-run", action="store_true",
                   help="report quarantines as `would quarantine` (dry_run: true in JSON), as the server does "
                        "with --detect-dry-run")
    r.add_argument("--json", action="store_true", help="one JSON object per alert and line")
    r.set_defaults(func=invalid_as(INVALID, _replay))
