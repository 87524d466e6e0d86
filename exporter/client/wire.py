"""Checks on what comes from outside (numbers, names, URLs, body sizes), and the list of
exporter URLs a client fails over between."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

MAX_SEQ = 2**53  # a master's sequence numbers and watermarks (docs/protocol.md, "Watermarks")
MAX_ID = 2**63 - 1  # failover record ids
MAX_NAME, MAX_URL = 256, 2048  # a master's name and base URL, as the client accepts them
MAX_INFO_BODY = 1 << 20  # failover pages, a master's entry, a /health: nothing larger is read
MAX_EXPORTERS = 64


def number(value: Any, low: int, high: int) -> int | None:
    """``value`` when it is an integer in ``low..high`` (not a bool), else None: numbers from a
    master or the exporter are never trusted as they come."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return value if ok else None


def name(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_NAME else None


def url(value: Any) -> str | None:
    ok = isinstance(value, str) and len(value) <= MAX_URL and value.startswith(("http://", "https://"))
    return value.rstrip("/") if ok else None


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or ValueError as soon as it grows past ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ValueError(f"answer of {resp.content_length} bytes, more than {limit}")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"answer larger than {limit} bytes")
    return bytes(body)


class Exporters:
    """The exporter base URLs a client may use (replicas, or one exporter under several names),
    and the one that answered last: every request starts there and moves on to the next when it
    cannot connect or times out. ``up`` is False once a full round found none answering."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        given = [urls] if isinstance(urls, str) else list(urls)
        if not 1 <= len(given) <= MAX_EXPORTERS:
            raise ValueError(f"give 1 to {MAX_EXPORTERS} exporter URLs, not {len(given)}")
        checked = [url(u) for u in given]
        bad = [u for u, c in zip(given, checked, strict=True) if c is None]
        if bad:
            raise ValueError(f"not an http(s) URL of at most {MAX_URL} characters: {bad[0]!r}")
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(c for c in checked if c))
        self.current = 0
        self.up = True

    @property
    def base(self) -> str:
        return self.urls[self.current]

    def order(self) -> list[int]:
        """Indexes to try, the last one that answered first."""
        n = len(self.urls)
        return [(self.current + k) % n for k in range(n)]

    def answered(self, index: int) -> None:
        self.current, self.up = index, True

    def owns(self, target: str) -> bool:
        """Whether ``target`` is on one of the exporters (the token goes there only)."""
        return any(target.startswith(f"{u}/") for u in self.urls)
