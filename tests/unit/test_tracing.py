"""services/tracing.py when no endpoint is configured (the default): no span is made, and what callers send as a
traceparent is checked before it names a trace."""

from __future__ import annotations

import secrets

from services import tracing


def test_off_by_default_every_span_is_the_same_empty_one():
    assert not tracing.enabled()
    with tracing.span("syscall memory_add", attributes={"aios.kind": "memory_add"}) as span:
        assert span is None
    assert tracing.span("x") is tracing.span("y", "server", metadata=(("traceparent", "00-…"),)) is tracing.OFF
    assert tracing.current_traceparent() == ""


def test_only_a_well_formed_traceparent_names_a_trace():
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    assert tracing.trace_id_of(f"00-{trace_id}-{span_id}-01") == trace_id
    for bad in (f"00-{trace_id.upper()}-{span_id}-01", f"00-0x{trace_id[2:]}-{span_id}-01", f"00-{'0' * 32}-{span_id}-01",
                f"00-{trace_id}-{span_id}-01 ", f"00-{trace_id}-{span_id}-0\u0661", f"00-{trace_id}-{span_id}",
                f"00-{trace_id}-{span_id}-01" * 40, "", "00-not-a-trace-01"):
        assert tracing.trace_id_of(bad) == "", bad
    assert tracing.traceparent_in((("authorization", "Bearer x"), ("traceparent", "v"))) == "v"
