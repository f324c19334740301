"""One span record shape for every source: the embedded receiver's JSONL store, OTLP protobuf, Jaeger JSON.

A record is a plain dict (one JSON line in the store):
  trace_id, span_id, parent_span_id (hex, "" for roots), name, kind ("SERVER", "CLIENT", ...),
  service, start_ns, end_ns, status ("UNSET"/"OK"/"ERROR"), status_message, attributes {k: v},
  events [{name, time_ns, attributes}]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _any_value(v) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def _attrs(kvs) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def records_from_otlp(request) -> Iterator[dict]:
    """Records from an ExportTraceServiceRequest."""
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        service = str(resource.get("service.name", "unknown"))
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                    "kind": _KINDS.get(s.kind, str(s.kind)), "service": service,
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    "status": _STATUS.get(s.status.code, str(s.status.code)), "status_message": s.status.message,
                    "attributes": _attrs(s.attributes),
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                               for e in s.events],
                }


def read_store(path: str | Path) -> list[dict]:
    """All records in a JSONL span store (a torn last line, from a receiver killed mid-write, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _jaeger_tags(tags: Iterable[dict]) -> dict[str, Any]:
    return {t["key"]: t.get("value") for t in tags or ()}


def records_from_jaeger(payload: dict) -> list[dict]:
    """Records from a Jaeger query API response (GET /api/traces: {"data": [trace, ...]}).

    Jaeger times are microseconds; the span kind and status live in tags (span.kind, otel.status_code).
    """
    out = []
    for tr in payload.get("data") or ():
        processes = tr.get("processes") or {}
        for s in tr.get("spans") or ():
            tags = _jaeger_tags(s.get("tags"))
            parent = ""
            for ref in s.get("references") or ():
                if ref.get("refType") == "CHILD_OF" and ref.get("traceID") == s["traceID"]:
                    parent = ref["spanID"]
                    break
            start_ns = int(s["startTime"]) * 1000
            status = str(tags.pop("otel.status_code", "UNSET")).upper()
            if tags.get("error") is True and status == "UNSET":
                status = "ERROR"
            events = []
            for log in s.get("logs") or ():
                fields = _jaeger_tags(log.get("fields"))
                events.append({"name": str(fields.pop("event", "log")), "time_ns": int(log["timestamp"]) * 1000,
                               "attributes": fields})
            out.append({
                "trace_id": s["traceID"].rjust(32, "0"), "span_id": s["spanID"].rjust(16, "0"),
                "parent_span_id": parent.rjust(16, "0") if parent else "", "name": s["operationName"],
                "kind": str(tags.pop("span.kind", "unspecified")).upper(),
                "service": processes.get(s.get("processID"), {}).get("serviceName", "unknown"),
                "start_ns": start_ns, "end_ns": start_ns + int(s.get("duration", 0)) * 1000,
                "status": status, "status_message": str(tags.pop("otel.status_description", "")),
                "attributes": tags, "events": events,
            })
    return out
