"""--log-format json: one JSON object a line, trace and span ids, access fields as keys."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from bgremove_gateway.runtime.logs import JsonFormatter

tracer = TracerProvider().get_tracer("test")


def _record(
    msg: str, *args: Any, extra: dict[str, Any] | None = None, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("bgremove.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, val in (extra or {}).items():
        setattr(record, key, val)
    return record


def test_a_line_is_one_json_object() -> None:
    line = JsonFormatter().format(_record("two\nlines %d", 2))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "two\nlines 2"
    assert doc["level"] == "WARNING" and doc["logger"] == "bgremove.test"
    assert doc["time"].endswith("Z")
    assert "trace_id" not in doc and "span_id" not in doc  # no span current


def test_the_current_span_s_ids() -> None:
    with tracer.start_as_current_span("s") as span:
        doc = json.loads(JsonFormatter().format(_record("hello")))
    ctx = span.get_span_context()
    assert doc["trace_id"] == format(ctx.trace_id, "032x")
    assert doc["span_id"] == format(ctx.span_id, "016x")


def test_fields_become_keys_and_the_access_trace_id_is_kept() -> None:
    fields = {"key": "k1", "status": "OK", "bytes_in": 10, "latency_ms": 1.5, "trace_id": "ab" * 16}
    with tracer.start_as_current_span("later"):
        doc = json.loads(JsonFormatter().format(_record("access", extra={"fields": fields})))
    assert doc["key"] == "k1" and doc["bytes_in"] == 10 and doc["latency_ms"] == 1.5
    assert doc["trace_id"] == "ab" * 16  # the one captured at the call's start
    with tracer.start_as_current_span("s") as span:
        no_trace = {**fields, "trace_id": "-", "message": "not this"}
        doc = json.loads(JsonFormatter().format(_record("access", extra={"fields": no_trace})))
    assert doc["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert doc["message"] == "access"


def test_an_exception_stays_in_its_line() -> None:
    doc = json.loads(JsonFormatter().format(_record("failed", exc=True)))
    assert "RuntimeError: boom" in doc["exception"]


SCRIPT = """
import logging
from bgremove_gateway.access.log import Access
from bgremove_gateway.runtime.logs import configure_logging
configure_logging("DEBUG", "json")
class Ctx:
    def peer(self): return "ipv4:127.0.0.1:1"
    def time_remaining(self): return None
logging.getLogger("PIL.TiffImagePlugin").debug("quiet")
logging.getLogger("bgremove.test").info("hello")
a = Access("RemoveBackground", Ctx())
a.bytes_in = 42
a.done()
"""


def test_configured_json_logging_writes_access_lines_with_their_fields() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stderr.splitlines()]
    assert docs[0]["message"] == "hello"
    access = docs[1]
    assert access["logger"] == "bgremove.access"
    assert access["method"] == "RemoveBackground" and access["bytes_in"] == 42
    assert access["status"] == "OK" and access["key"] == "-"
    assert access["message"].startswith("key=- peer=ipv4:127.0.0.1:1 method=RemoveBackground status=OK")
