"""The trace format (trustmesh/detect/trace.py) as properties: every record written reads back
the same, and no line anyone hands in makes the reader fail with anything but a
TraceFormatError that names the line."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from trustmesh.detect.trace import FIELDS, MAX_COUNT, TraceFormatError, TraceRecord, read_trace, record_to_line
from trustmesh.flows import DECISIONS

texts = st.text(max_size=60)  # any unicode, lone surrogates and newlines included
records = st.builds(
    TraceRecord,
    # Whole seconds (the format's resolution) from 1970 (0 is the wire's "never") to 9999.
    st.integers(1, 253_402_300_799).map(float),
    texts, texts.filter(bool), texts.filter(bool), st.integers(0, 65535), st.sampled_from(DECISIONS),
    st.integers(0, MAX_COUNT), st.integers(0, MAX_COUNT), st.integers(0, MAX_COUNT))


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=5))
def test_written_records_read_back_identical(written: list[TraceRecord]) -> None:
    lines = [record_to_line(r) for r in written]
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)  # one record, one line
    assert list(read_trace(lines, "trace.jsonl")) == written
    assert list(read_trace([line.encode() for line in lines], "trace.jsonl")) == written  # as a file reads them


values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), texts,
                   st.sampled_from(["2026-11-01T10:03:00Z", "0001-01-01T00:00:00+14:00", "allow", "unverified:1"]),
                   st.lists(st.integers(), max_size=2))
objects = st.dictionaries(st.sampled_from(FIELDS), values).map(json.dumps)


@settings(max_examples=500, deadline=None)
@given(st.one_of(texts, objects))
@example("[" * 100_000)  # nested deeper than the JSON parser recurses
@example('{"ts": "0001-01-01T00:00:00+14:00", "source": "a", "destination": "b", "port": 1, "decision": "allow"}')
@example("x" * 70_000)
def test_any_line_is_a_record_or_a_trace_format_error_naming_it(line: str) -> None:
    try:
        read = list(read_trace(["", line], "hostile.jsonl"))  # line 1 blank: skipped
    except TraceFormatError as err:
        assert str(err).startswith("hostile.jsonl line 2")
        return
    assert len(read) == (1 if line.strip() else 0)
    assert all(r.decision in DECISIONS and 0 <= r.port <= 65535 and r.source and r.destination for r in read)
