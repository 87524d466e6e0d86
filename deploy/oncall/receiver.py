"""A stand-in for the on-call: an Alertmanager webhook receiver that logs every notification.

Stdlib only, so that it runs in a bare ``python:3.11-slim`` container (docker-compose.yml) and in
tests without installing anything. Each POST body is logged as one JSON line (path, status,
alert names and masters first, so that ``docker compose logs -f oncall`` reads well) and kept in
memory; ``GET /received`` returns everything received so far, for scripted checks.

    python deploy/oncall/receiver.py --host 127.0.0.1 --port 9099
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 1 << 20


class Inbox:
    """Notifications received, in order; shared by the handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[dict[str, Any]] = []

    def add(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(item)

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)


def summarize(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The line an on-call engineer wants to read first, then the full notification."""
    alerts = body.get("alerts") or []
    return {
        "path": path,
        "status": body.get("status"),
        "receiver": body.get("receiver"),
        "alerts": [
            {
                "alertname": a.get("labels", {}).get("alertname"),
                "master": a.get("labels", {}).get("master"),
                "severity": a.get("labels", {}).get("severity"),
                "status": a.get("status"),
                "summary": a.get("annotations", {}).get("summary"),
            }
            for a in alerts
        ],
        "notification": body,
    }


def make_handler(inbox: Inbox) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "oncall-receiver/1"

        def _reply(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": "body too large"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                self._reply(400, {"error": f"invalid JSON: {exc}"})
                return
            entry = summarize(self.path, body if isinstance(body, dict) else {"body": body})
            inbox.add(entry)
            print(json.dumps(entry, sort_keys=True), flush=True)
            self._reply(200, {"ok": True})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/received", ""):
                self._reply(200, inbox.all())
            elif self.path == "/healthz":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": "not found"})

        def log_message(self, format: str, *args: Any) -> None:
            print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9099)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(Inbox()))
    print(f"on-call receiver listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
