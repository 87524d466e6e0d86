"""Failover hooks: operator webhooks before and after a failover, and Alertmanager posts.

The pre-hook is a veto: any failure (render error, timeout, non-2xx) aborts the failover, the
way orchestrator's PreFailoverProcesses do, so an operator can gate failovers on their own
checks. The post-hook and Alertmanager are notifications: best effort, logged, never change
the failover's result. Bodies are jinja2 templates rendered in a sandbox with the failover
record as context, and must render to JSON (checked before sending, so a template typo is a
clear error in the record rather than a confused receiver).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import aiohttp
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from exporter.config import AlertmanagerConfig, HookConfig

log = logging.getLogger(__name__)
ALERT_HOLD = timedelta(minutes=5)  # how long an event alert stays firing in Alertmanager


class HookError(Exception):
    """A hook could not be delivered; ``str()`` says why."""


_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_ENV.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": str}


@lru_cache(maxsize=64)
def _template(source: str) -> Any:
    return _ENV.from_string(source)


def render_body(template: str | None, context: Mapping[str, Any]) -> bytes:
    """The hook body: the rendered template (validated as JSON) or the context as JSON."""
    if template is None:
        return json.dumps(context, default=str, sort_keys=True).encode()
    try:
        text = _template(template).render(**context)
    except TemplateError as exc:
        raise HookError(f"body template error: {exc}") from None
    try:
        json.loads(text)
    except ValueError as exc:
        raise HookError(f"body template did not render to JSON ({exc}): {text[:120]!r}") from None
    return text.encode()


async def call_hook(session: aiohttp.ClientSession, hook: HookConfig,
                    context: Mapping[str, Any], phase: str) -> None:
    """POST the rendered body to the hook URL; raise HookError unless it answers 2xx."""
    body = render_body(hook.body, context)
    try:
        async with asyncio.timeout(hook.timeout):
            async with session.post(hook.url, data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                if resp.status >= 300:
                    raise HookError(f"{phase} hook {hook.url}: HTTP {resp.status}: {text}")
    except TimeoutError:
        raise HookError(f"{phase} hook {hook.url}: timeout after {hook.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise HookError(f"{phase} hook {hook.url}: {type(exc).__name__}: {exc}") from None
    log.info("%s hook %s delivered", phase, hook.url,
             extra={"event": "failover_hook", "phase": phase, "url": hook.url})


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_payload(record: Mapping[str, Any],
                  generator_url: str | None = None) -> list[dict[str, Any]]:
    """Alertmanager v2 alerts for one finished failover record (a one-element list)."""
    ok = record.get("result") == "success"
    started = datetime.fromtimestamp(float(record.get("started") or 0), UTC)
    finished = datetime.fromtimestamp(
        float(record.get("finished") or record.get("started") or 0), UTC)
    alert: dict[str, Any] = {
        "labels": {
            "alertname": "HAFailoverExecuted" if ok else "HAFailoverFailed",
            "master": str(record.get("master")),
            "backup": str(record.get("backup") or "none"),
            "result": str(record.get("result")),
            "severity": "info" if ok else "critical",  # as the HAFailover* alert rules
        },
        "annotations": {
            "summary": (f"master {record.get('master')} failed over to {record.get('backup')}"
                        if ok else f"failover of master {record.get('master')} "
                        f"{record.get('result')}"),
            "description": str(record.get("reason") or ""),
            "failover_id": str(record.get("id")),
            "trigger": str(record.get("trigger")),
            "duration_seconds": f"{float(record.get('duration') or 0):.3f}",
        },
        "startsAt": _iso(started),
        "endsAt": _iso(finished + ALERT_HOLD),
    }
    if generator_url:
        alert["generatorURL"] = generator_url
    return [alert]


async def send_alert(session: aiohttp.ClientSession, am: AlertmanagerConfig,
                     record: Mapping[str, Any], timeout: float = 5.0,
                     generator_url: str | None = None) -> None:
    """POST {url}/api/v2/alerts; raise HookError saying why unless it answers 2xx."""
    url = am.url.rstrip("/") + "/api/v2/alerts"
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json=alert_payload(record, generator_url)) as resp:
                if resp.status >= 300:
                    text = (await resp.read())[:200].decode("utf-8", "replace")
                    raise HookError(f"alertmanager {url} answered HTTP {resp.status}: {text}")
    except TimeoutError:
        raise HookError(f"alertmanager {url} unreachable: timeout after {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise HookError(f"alertmanager {url} unreachable: {exc or type(exc).__name__}") from None
    log.info("failover %s posted to alertmanager", record.get("id"),
             extra={"event": "alertmanager_post", "ok": True, "master": record.get("master")})


async def post_alert(session: aiohttp.ClientSession, am: AlertmanagerConfig,
                     record: Mapping[str, Any], timeout: float = 5.0,
                     generator_url: str | None = None) -> bool:
    """Best effort ``send_alert``; False (and a log line) on any error."""
    try:
        await send_alert(session, am, record, timeout, generator_url)
    except HookError as exc:
        log.warning("%s", exc, extra={"event": "alertmanager_post", "ok": False})
        return False
    return True
