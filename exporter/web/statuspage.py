"""GET /: the status page for people: masters, duties, recent failovers, what is firing.

Each recent failover shows the state its backup got (``live``, ``checkpoint``, or ``none``
when it moved none, marked as a warning), as the move's ``fetch`` step recorded it.

The Duties section puts, for every duty, the masters that report serving it (their own
/health) next to the holder the exporter believes in (the duty table), with a red UNSERVED or
SPLIT mark: a fleet of green masters that serves nothing must not look healthy.

jinja2 with autoescape on, so a master named ``<script>`` shows as text. Firing alerts come
from Alertmanager's v2 API when ``alertmanager.url`` is set (bounded wait; the page still
renders when Alertmanager is away).

The page runs no script, and its one inline stylesheet (templates/status.css) is allowed by
its sha256 in the Content-Security-Policy, so injected markup could neither run nor restyle it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from exporter import __version__
from exporter.failover import EXECUTED
from exporter.metrics import DutyStatus
from exporter.service import Service
from exporter.web.headers import page_csp
from exporter.web.keys import SERVICE

_env = Environment(
    loader=PackageLoader("exporter.web", "templates"),
    autoescape=select_autoescape(["html"], default=True),
)
ALERTS_TIMEOUT = 1.0
STYLE = resources.files("exporter.web").joinpath("templates/status.css").read_text("utf-8")
STYLE_SHA256 = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
PAGE_CSP = page_csp([STYLE_SHA256])


def _utc(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def _text(obj: object, key: str) -> str:
    """``obj[key]`` when obj is a mapping and the value a string, else "": whatever the
    server at alertmanager.url answers, the page renders."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else ""


async def firing_alerts(service: Service) -> tuple[list[dict[str, str]], str | None]:
    am = service.config.alertmanager
    if am is None or service.session is None:
        return [], "Alertmanager is not configured (alertmanager.url)."
    url = f"{am.url.rstrip('/')}/api/v2/alerts"
    try:
        async with asyncio.timeout(ALERTS_TIMEOUT):
            async with service.session.get(
                url, params={"active": "true", "silenced": "false", "inhibited": "false"}
            ) as resp:
                if resp.status != 200:
                    return [], f"Alertmanager at {am.url} answered HTTP {resp.status}."
                raw = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return [], f"Alertmanager at {am.url} is not reachable ({type(exc).__name__})."
    except ValueError:
        raw = None
    if not isinstance(raw, list):
        return [], f"Alertmanager at {am.url} did not answer a list of alerts (API v2)."
    alerts = [
        {
            "name": _text(a.get("labels"), "alertname") or "?",
            "severity": _text(a.get("labels"), "severity"),
            "master": _text(a.get("labels"), "master"),
            "summary": _text(a.get("annotations"), "summary"),
            "since": _text(a, "startsAt")[:19].replace("T", " "),
        }
        for a in raw
        if isinstance(a, dict)
    ]
    return sorted(alerts, key=lambda a: (a["severity"] != "critical", a["name"])), None


def _fetch_source(steps: object, step: str, status: str | None) -> str | None:
    """The ``source`` of the first entry of ``steps`` that is ``step`` (with ``status``)."""
    for entry in steps if isinstance(steps, list) else ():
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        if status is not None and entry.get("status") != status:
            continue
        detail = entry.get("detail")
        source = detail.get("source") if isinstance(detail, dict) else None
        return source if isinstance(source, str) else None
    return None


def state_source(service: Service, record: dict[str, Any]) -> str | None:
    """Where the state of a move came from (live, checkpoint, none), as the ``fetch`` step of
    its record says; None for a move that never got that far (not executed, or failed before
    a state was looked for).

    The page's records are brief: no steps and no candidates, which at a thousand masters are
    ~150 kB a record. So the move's journal is read first (one indexed read; its ``fetch
    done`` entry carries the same source), and only a move with no journal here (a cluster
    replica that imported it from the leader) is read whole."""
    if record.get("result") not in EXECUTED:
        return None
    fid = record["id"]
    source = _fetch_source(service.store.journal_entries(fid), "fetch", "done")
    if source is None:
        whole = service.store.get_failover(fid)
        source = _fetch_source(whole.get("steps") if whole else None, "fetch", None)
    return source


def failover_rows(service: Service, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` failovers, each with its start time in UTC (``when``) and where
    its state came from (``state_source``)."""
    return [dict(f, when=_utc(f.get("started")), state_source=state_source(service, f))
            for f in service.recent_failovers(limit)]


def duty_rows(service: Service, status: DutyStatus) -> list[dict[str, Any]]:
    """One row per duty: its state, who reports serving it, whom the exporter believes holds
    it, and whether the masters agree (the believed holder is the one and only reporter)."""
    rows = []
    for duty, reported in status.holders.items():
        believed = service.duties.holder_of(duty)
        rows.append({
            "name": duty,
            "state": status.state(duty),
            "reported": list(reported),
            "believed": believed,
            "agrees": believed is not None and list(reported) == [believed],
        })
    return rows


async def status_page(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    timeout = service.config.failover.recovery_timeout
    weights = service.routing_weights()
    masters: list[dict[str, Any]] = []
    for rt in service.fleet:
        m = rt.as_dict(service.duties.role_of(rt.name), timeout)
        m["weight_effective"] = weights.get(rt.name, 0.0)
        masters.append(m)
    status = service.duty_status()
    duties = duty_rows(service, status)
    failovers = failover_rows(service, 10)
    alerts, alerts_error = await firing_alerts(service)
    html = _env.get_template("status.html").render(
        masters=masters,
        healthy=sum(m["state"] == "healthy" for m in masters),
        duties=duties,
        served=sum(d["state"] == "served" for d in duties),
        score=service.fleet_health_score(status),
        strategy=service.strategy(),
        failover_mode=service.failover_mode(),
        failovers=failovers,
        alerts=alerts,
        alerts_error=alerts_error,
        version=__version__,
        refresh=max(2, int(service.config.probe.interval)),
        style=Markup(STYLE),  # our own file, inserted verbatim so that its hash matches
    )
    resp = web.Response(text=html, content_type="text/html")
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp


ROUTES: list[web.RouteDef] = [web.get("/", status_page)]
