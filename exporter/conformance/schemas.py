"""JSON Schemas (2020-12) of every body of the master protocol: the one source of truth.

docs/master-protocol.yaml is rendered from these (``exporter.conformance.openapi``) and a test
asserts the file is exactly that rendering; the conformance checker validates answers against
these same objects at run time, so the written spec and the check can never disagree.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

MAX_COUNT = 2**53  # counts above this lose integer precision in a float64 sample
MAX_EPOCH = 2**63 - 1
MAX_NAME = 200  # a master's (and so a duty's) name, as the exporter's config allows
MAX_DUTIES = 10_000
STATUSES = ("ok", "degraded", "down")
STALE_EPOCH = "stale epoch"
REF = "#/components/schemas/"


def ref(name: str) -> Schema:
    return {"$ref": REF + name}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


_COUNT: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
_PERCENT: Schema = {"type": "number", "minimum": 0, "maximum": 100}
_DUTIES: Schema = {"type": "array", "items": ref("Name"), "maxItems": MAX_DUTIES,
                   "uniqueItems": True}
_WATERMARK = ("Optional (docs/protocol.md, 'Watermarks'): the highest message sequence number "
              "whose message this snapshot holds (pending, or processed into its state): "
              "every message numbered up to it is covered.")

SCHEMAS: dict[str, Schema] = {
    "Name": {
        "type": "string", "minLength": 1, "maxLength": MAX_NAME,
        "description": "A master's name as configured in the exporter; a duty is named after "
                       "the master it belongs to. Names SHOULD use only [A-Za-z0-9._-].",
    },
    "Checksum": {
        "type": "string", "pattern": "^[0-9a-f]{64}$",
        "description": "sha256, lowercase hex, of the canonical JSON of a snapshot without "
                       "its checksum key (docs/protocol.md, 'The checksum').",
    },
    "Epoch": {
        "type": "integer", "minimum": 0, "maximum": MAX_EPOCH,
        "description": "A controller's fencing epoch: it only grows.",
    },
    "Watermark": {
        "type": "integer", "minimum": 0, "maximum": MAX_COUNT,
        "description": "A message sequence number: a master numbers the messages it accepts "
                       "1, 2, 3, ... and never reuses a number while its state lives.",
    },
    "Health": {
        "type": "object",
        "description": "GET /health. Only status is required; null in an optional field "
                       "means 'not reported'. Numbers must be finite and in range, or the "
                       "exporter's probe counts the answer as invalid_response. Unknown "
                       "fields are allowed.",
        "required": ["status"],
        "properties": {
            "status": {"enum": list(STATUSES)},
            "queue_length": _nullable(_COUNT),
            "active_messages": _nullable(_COUNT),
            "cpu_percent": _nullable(_PERCENT),
            "memory_percent": _nullable(_PERCENT),
            "active": {"type": ["boolean", "null"],
                       "description": "Whether the master serves now (false when fenced)."},
            "duties": {**_nullable(_DUTIES),
                       "description": "The duties it serves now: its own name while it holds "
                                      "its own duty, plus every duty taken over."},
            "name": ref("Name"),
            "region": {"type": "string"},
            "epoch": {"anyOf": [ref("Epoch"), {"type": "null"}],
                      "description": "The highest fencing epoch obeyed; null before any."},
            "watermark": {"anyOf": [ref("Watermark"), {"type": "null"}],
                          "description": "Optional: the highest sequence number given to "
                                         "a message so far (0 before any)."},
            "imported_watermarks": {
                "type": ["object", "null"], "additionalProperties": ref("Watermark"),
                "propertyNames": ref("Name"), "maxProperties": MAX_DUTIES,
                "description": "Optional: the watermark of each imported snapshot that "
                               "carries one, by the name of the master it came from. A "
                               "producer reads it after a failover to re-send what that "
                               "master acknowledged above it."},
        },
    },
    "Session": {"type": "object", "description": "Opaque to the exporter."},
    "Message": {"type": "object", "description": "A message not yet processed; opaque to "
                                                 "the exporter (the simulated master's have "
                                                 "an id)."},
    "ImportedSnapshot": {
        "type": "object",
        "description": "An imported snapshot as the master keeps it; its checksum is one of "
                       "the two an import may answer.",
        "required": ["checksum"],
        "properties": {"checksum": ref("Checksum"),
                       "watermark": {**ref("Watermark"),
                                     "description": "The source's watermark, kept as "
                                                    "received."}},
    },
    "Snapshot": {
        "type": "object",
        "description": "A master's transferable state. Every key but checksum is covered by "
                       "the checksum, unknown keys included; a master keeps them as received.",
        "required": ["master", "sessions", "pending_messages", "checksum"],
        "properties": {
            "master": ref("Name"),
            "region": {"type": "string"},
            "sessions": {"type": "object", "additionalProperties": ref("Session"),
                         "description": "Open sessions by id."},
            "pending_messages": {"type": "array", "items": ref("Message")},
            "config": {"type": "object"},
            "imported": {"type": "object", "additionalProperties": ref("ImportedSnapshot"),
                         "description": "Snapshots imported from other masters, by the name "
                                        "of the master they came from."},
            "watermark": {**ref("Watermark"), "description": _WATERMARK},
            "checksum": ref("Checksum"),
        },
    },
    "ImportAnswer": {
        "type": "object",
        "required": ["checksum"],
        "properties": {"checksum": ref("Checksum"), "master": ref("Name")},
    },
    "DutyRequest": {
        "type": "object",
        "description": "Body of /activate and /deactivate. taken_over absent, null or empty "
                       "names the master's own duty (activate) or everything (deactivate).",
        "properties": {"taken_over": {"anyOf": [ref("Name"), {"type": "null"},
                                                {"const": ""}]}},
    },
    "Activity": {
        "type": "object",
        "description": "What the master serves after the call (as /health would say).",
        "required": ["active", "duties"],
        "properties": {"active": {"type": "boolean"}, "duties": _DUTIES},
    },
    "Removed": {
        "type": "object",
        "required": ["removed"],
        "properties": {"removed": {"type": "boolean",
                                   "description": "false: nothing of that name was imported"}},
    },
    "Error": {
        "type": "object",
        "description": "Every answer with a status of 400 or more.",
        "required": ["error"],
        "properties": {"error": {"type": "string", "minLength": 1}},
    },
    "StaleEpoch": {
        "type": "object",
        "description": "409 to a control call whose X-HA-Epoch is lower than the highest the "
                       "master has obeyed.",
        "required": ["error"],
        "properties": {"error": {"const": STALE_EPOCH}, "epoch": ref("Epoch")},
    },
}


def validator_root(name: str) -> Schema:
    """A self-contained schema for ``name``: its ``$ref``s resolve inside it."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": REF + name,
            "components": {"schemas": SCHEMAS}}
