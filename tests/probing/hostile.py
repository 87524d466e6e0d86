"""Masters that attack the prober: absurd numbers, endless bodies, a gzip bomb, redirects.

One aiohttp app serves every case at ``/{case}/health`` (a master's URL is ``base/case``), so
the unit tests and the end-to-end test probe the very same misbehaviour. ``seen`` counts the
requests per case, and ``encodings`` records the Accept-Encoding each probe sent.
"""

from __future__ import annotations

import functools
import zlib
from collections import Counter

from aiohttp import web

GOOD = (
    b'{"status": "ok", "queue_length": 3, "active_messages": 1, "cpu_percent": 12.5, '
    b'"memory_percent": 40.0, "active": true, "duties": ["good"]}'
)
#: Raw bodies (json.dumps could not write most of them).
BODIES: dict[str, bytes] = {
    "good": GOOD,
    "big-float": b'{"status": "ok", "queue_length": 1e200}',
    "huge-int": b'{"status": "ok", "queue_length": 1' + b"0" * 399 + b"}",
    "negative": b'{"status": "ok", "queue_length": -5}',
    "nan": b'{"status": "ok", "queue_length": NaN}',
    "infinity": b'{"status": "ok", "queue_length": Infinity}',
    "bool-queue": b'{"status": "ok", "queue_length": true}',
}
BOMB_INFLATED = 256 * 2**20
ENDLESS_CHUNK = 64 * 1024
#: 4096 chunks of 64 KiB: 256 MiB, endless for any sane cap, yet the loop is bounded.
ENDLESS_CHUNKS = 4096


@functools.cache
def gzip_bomb(inflated: int = BOMB_INFLATED) -> bytes:
    """gzip of ``inflated`` zero bytes (256 MiB -> about 250 kB), built by streaming 1 MiB at
    a time: the inflated data is never held."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(2**20)
    parts = [comp.compress(block) for _ in range(inflated // len(block))]
    parts.append(comp.flush())
    return b"".join(parts)


def hostile_app(seen: Counter[str], encodings: list[str], redirect_to: str = "") -> web.Application:
    """The hostile fleet; ``redirect_to`` is where ``/redirect/health`` points (302)."""

    async def health(request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        seen[case] += 1
        encodings.append(request.headers.get("Accept-Encoding", ""))
        if case in BODIES:
            return web.Response(body=BODIES[case], content_type="application/json")
        if case == "bomb":
            return web.Response(
                body=gzip_bomb(),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if case == "redirect":
            raise web.HTTPFound(f"{redirect_to}/health")
        if case == "endless":
            return await endless(request)
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{case}/health", health)
    return app


async def endless(request: web.Request) -> web.StreamResponse:
    """A chunked /health that starts like JSON and never ends (until the client hangs up)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    chunk = b"x" * ENDLESS_CHUNK
    try:
        await resp.write(b'{"status": "ok", "pad": "')
        for _ in range(ENDLESS_CHUNKS):
            await resp.write(chunk)
    except ConnectionError:
        pass  # the prober hung up: the point
    return resp


def counting_app(seen: Counter[str]) -> web.Application:
    """Another server, the target of the redirect: it must never be asked."""

    async def health(_: web.Request) -> web.Response:
        seen["target"] += 1
        return web.Response(body=GOOD, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    return app
