"""``ha-exporter conformance``: checks a running master against docs/protocol.md.

One ``Result`` per requirement, in a fixed order; read-only checks first, then with
``destructive`` the ones that import, activate, fence and test fencing epochs, ending with the
master's activity restored. Answers are validated against ``schemas.SCHEMAS``, the source
docs/master-protocol.yaml is rendered from.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp

from exporter.conformance.checks import run_read_only
from exporter.conformance.core import CALL_TIMEOUT, Client, Report, Result
from exporter.conformance.destructive import run_destructive

__all__ = ["Result", "check_master", "url_problem"]


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a master's base URL; None when it can."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host"
    if parts.query or parts.fragment:
        return f"{url!r}: a master's base URL has no query or fragment"
    return None


async def check_master(url: str, *, destructive: bool = False, epoch: int | None = None,
                       timeout: float = CALL_TIMEOUT) -> list[Result]:
    """Every requirement's result for the master at ``url`` (its base URL)."""
    report = Report()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     headers={"User-Agent": "ha-exporter-conformance"}) as s:
        client = Client(s, url, timeout)
        seen = await run_read_only(report, client)
        if destructive:
            await run_destructive(report, client, seen, epoch)
    return report.results
