"""The master protocol as an OpenAPI 3.1 document, built from ``schemas.SCHEMAS``.

``python -m exporter.conformance.openapi > docs/master-protocol.yaml`` writes the spec's
machine-readable half; a test asserts the file equals ``render()``, so it is never edited by
hand and never drifts from what the conformance checker validates.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from exporter.conformance.schemas import MAX_EPOCH, SCHEMAS, STALE_EPOCH, Schema, ref

VERSION = "1.0.0"
EPOCH_HEADER = "X-HA-Epoch"
JSON = "application/json"


def _body(schema: str, description: str, **extra: Any) -> Schema:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}, **extra}


def _error(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


RESPONSES: dict[str, Schema] = {
    "BadRequest": _body("Error", "The body is not JSON, not an object, not a valid snapshot "
                                 "(a checksum mismatch included), or X-HA-Epoch is not one "
                                 "integer. Nothing was changed."),
    "StaleEpoch": _body("StaleEpoch", f'X-HA-Epoch is lower than the highest epoch this master '
                                      f'has obeyed: {{"error": "{STALE_EPOCH}"}}. Nothing was '
                                      f'changed; the exporter fails the call with the reason '
                                      f'"stale epoch".'),
    "TooLarge": _body("Error", "The body is larger than the master accepts."),
    "EpochRequired": _body("Error", "Only from a master set to refuse controllers that "
                                    "predate epochs: the call had no X-HA-Epoch."),
    "Unavailable": _body("Error", "The master cannot serve the call now; the exporter counts "
                                  "it as a failed step (rollback, next candidate)."),
}

PARAMETERS: dict[str, Schema] = {
    "Epoch": {
        "name": EPOCH_HEADER, "in": "header", "required": False,
        "description": "The controller's fencing epoch, a decimal integer. Sent by the "
                       "exporter on every control call. Lower than the highest obeyed: 409 "
                       "stale epoch. Equal or higher: obeyed, and remembered when higher. "
                       "Absent: accepted and compared with nothing (controllers that predate "
                       "epochs), unless the master is set to require it (then 428).",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EPOCH},
    },
}

_CONTROL_ERRORS: dict[str, Schema] = {
    "400": _error("BadRequest"), "409": _error("StaleEpoch"), "413": _error("TooLarge"),
    "428": _error("EpochRequired"), "503": _error("Unavailable"),
}
_EPOCH = [{"$ref": "#/components/parameters/Epoch"}]


def _activity(summary: str, description: str) -> Schema:
    return {
        "summary": summary, "description": description, "parameters": _EPOCH,
        "requestBody": {"required": False, "description": "May be empty (no body at all).",
                        "content": {JSON: {"schema": ref("DutyRequest")}}},
        "responses": {"200": _body("Activity", "Done (or already so)."), **_CONTROL_ERRORS},
    }


PATHS: dict[str, Schema] = {
    "/health": {"get": {
        "summary": "Health and load figures, and what the master serves",
        "description": "Probed every probe.interval without following redirects and with a "
                       "body cap (64 KiB by default). Non-2xx, a timeout, a body that is not "
                       "a JSON object, an unknown status or a figure out of range is a failed "
                       "probe; status down is a failed probe too.",
        "responses": {"200": _body("Health", "The master's health.")},
    }},
    "/state": {
        "get": {
            "summary": "Snapshot of the transferable state",
            "description": "Read for checkpoints (every failover.checkpoint_interval) and at "
                           "the fetch step of a move. The exporter verifies the checksum.",
            "parameters": [{"name": "If-None-Match", "in": "header", "required": False,
                            "schema": {"type": "string"},
                            "description": "The ETag of an earlier answer."}],
            "responses": {
                "200": _body("Snapshot", "The snapshot.", headers={"ETag": {
                    "description": "Optional: the quoted checksum.",
                    "schema": {"type": "string"}}}),
                "304": {"description": "If-None-Match names the current ETag; no body."},
            },
        },
        "post": {
            "summary": "Import another master's snapshot",
            "description": "Kept under the snapshot's master name, replacing an earlier "
                           "import of that name (so importing twice is importing once).",
            "parameters": _EPOCH,
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("Snapshot")}}},
            "responses": {"200": _body("ImportAnswer", "Stored; checksum is the snapshot's "
                                       "own or that of its stored form."), **_CONTROL_ERRORS},
        },
    },
    "/state/{source}": {"delete": {
        "summary": "Drop an imported snapshot",
        "description": "source is the name of the master whose snapshot was imported (the "
                       "duty it carried). Dropping what is not there is a success.",
        "parameters": [*_EPOCH, {"name": "source", "in": "path", "required": True,
                                 "schema": ref("Name")}],
        "responses": {"200": _body("Removed", "Dropped, or nothing to drop."),
                      "404": _body("Error", "Nothing to drop; the exporter reads it as 200."),
                      **_CONTROL_ERRORS},
    }},
    "/activate": {"post": _activity(
        "Serve a duty",
        "Body {} (or none): serve the master's own duty. Body {\"taken_over\": NAME}: serve "
        "NAME's duty as well. The master becomes active and the duty joins duties once.")},
    "/deactivate": {"post": _activity(
        "Release a duty, or fence",
        "Body {\"taken_over\": NAME}: stop serving NAME's duty; a master left with no duty "
        "becomes inactive. No body, {} or a null taken_over: fence, stop serving altogether "
        "(active false, duties empty). Imported state is kept either way.")},
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the master protocol."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ha-exporter master protocol",
            "version": VERSION,
            "description": "What a master serves so that ha-exporter can probe it and move "
                           "its duties. Normative text: docs/protocol.md. Generated by "
                           "`python -m exporter.conformance.openapi`: do not edit by hand.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "responses": RESPONSES, "parameters": PARAMETERS},
    }


class _Dumper(yaml.SafeDumper):
    """Block style, no aliases: the file reads like a hand-written spec."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """The YAML text of ``document()``, as docs/master-protocol.yaml holds it."""
    head = ("# The master protocol, OpenAPI 3.1. Generated from exporter/conformance/schemas.py"
            "\n# by `python -m exporter.conformance.openapi`; docs/protocol.md is the text.\n")
    return head + yaml.dump(document(), Dumper=_Dumper, sort_keys=False, width=96,
                            allow_unicode=True, default_flow_style=False)


if __name__ == "__main__":
    sys.stdout.write(render())
