"""HTTP/1.1 GET on long-lived keep-alive connections, for the probe hot loop.

A probe here is one ``transport.write`` of request bytes built once per URL and llhttp (the C
parser of Node.js, through ``httptools``) reading the answer in ``data_received``: no session,
request, response, stream or task objects per probe. ``Conn`` is one connection, owned by one
master (``Owner``: the prober's per-master slot), which it tells how each exchange ended:

* ``answered(status, body)``: a complete 2xx answer (``body`` at most ``cap`` bytes), or a non-2xx
  status as soon as its head is in (``body`` is ``None``: not read, as before);
* ``refused(detail)``: the body was not read to the end: compressed, or over ``cap`` (declared or
  counted); the connection is dropped, since the rest of the body is unread;
* ``failed(detail, retry)``: no usable answer (connection lost, bad HTTP); ``retry`` when a reused
  keep-alive connection broke before a byte of answer came, which is the race with a server
  closing an idle connection (RFC 9112 9.3.1): the caller asks again once on a new connection,
  as aiohttp did.

``Pool`` bounds the connections open at once (``probe.max_connections``): a master without a
connection opens one while under the cap; at the cap the least recently used idle connection of
another master is closed for it, and with none idle it waits (within its own deadline) for one
to close. Timeouts are not here: the prober's deadline scan aborts an exchange that took too
long (``Conn.abort``).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from typing import Protocol, cast

import httptools
from yarl import URL

#: What a server that closed without a word is called (aiohttp's wording, kept for the logs).
DISCONNECTED = "ServerDisconnectedError: Server disconnected"
_IDENTITY = (b"", b"identity")


class Owner(Protocol):
    """What a connection reports to: the master it belongs to."""

    def answered(self, status: int, body: bytes | None) -> None: ...
    def refused(self, detail: str) -> None: ...
    def failed(self, detail: str, retry: bool) -> None: ...
    def lost(self, conn: Conn) -> None: ...
    def broke(self, exc: Exception) -> None: ...


_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


class Endpoint:
    """Where a probe goes and the bytes that ask, built once per URL. The request is what
    aiohttp sent for a probe: the same Host (default port omitted), ``Accept: */*``,
    ``Accept-Encoding: identity``, ``User-Agent: ha-exporter``, and Basic credentials when
    the URL carries some; ``headers`` are extra ``Name: value`` lines (a cluster member's
    ``X-HA-Observer``), ASCII."""

    __slots__ = ("host", "port", "request", "server_hostname", "ssl", "url")

    def __init__(self, url: str, headers: tuple[str, ...] = ()) -> None:
        u = URL(url)
        if u.scheme not in ("http", "https") or not u.raw_host or u.port is None:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.host: str = u.raw_host
        self.port: int = u.port
        https = u.scheme == "https"
        self.ssl: ssl.SSLContext | None = _ssl_context() if https else None
        self.server_hostname: str | None = u.raw_host if https else None
        lines = [
            f"GET {u.raw_path_qs or '/'} HTTP/1.1",
            f"Host: {u.host_port_subcomponent}",
            "User-Agent: ha-exporter",
            "Accept: */*",
            "Accept-Encoding: identity",
        ]
        if u.user is not None:
            token = base64.b64encode(f"{u.user}:{u.password or ''}".encode("latin-1"))
            lines.append(f"Authorization: Basic {token.decode('ascii')}")
        lines += headers
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class _Stop(Exception):
    """Raised in a parser callback to stop reading (llhttp then raises a callback error)."""


class Conn(asyncio.Protocol):
    """One keep-alive connection of one master; at most one exchange on it at a time."""

    __slots__ = (
        "body",
        "busy",
        "cap",
        "chunked",
        "complete",
        "counted",
        "encoding",
        "extra",
        "got",
        "head",
        "keep",
        "length",
        "owner",
        "parser",
        "pool",
        "refusal",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, pool: Pool, owner: Owner) -> None:
        self.pool = pool
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # an exchange is under way
        self.reused = False  # an earlier exchange completed on it
        self.counted = True  # holds one of the pool's places (until released)
        self.cap = 0
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.body: bytes | bytearray = b""
        self.length = -1
        self.encoding = b""
        self.chunked = False
        self.head = False
        self.complete = False
        self.got = False
        self.keep = False
        self.extra = False
        self.refusal = ""

    # --- used by the prober ----------------------------------------------------------------
    def send(self, request: bytes, cap: int) -> None:
        """Start an exchange (the connection is open and idle)."""
        assert self.transport is not None and not self.busy
        self._clear()
        self.cap = cap
        self.busy = True
        self.pool.taken(self)
        self.transport.write(request)

    def abort(self) -> None:
        """Drop the connection now; an exchange under way ends unreported (its owner already
        knows: it timed out, or the prober stops)."""
        self.busy = False
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.abort()
        self.pool.release(self)

    # --- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:  # a bug: this exchange fails, the others go on
            self.busy = False
            self.abort()
            self.owner.lost(self)
            self.owner.broke(exc)

    def _received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: this is no HTTP server we can talk to
            self.abort()
            self.owner.lost(self)
            return
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not (self.refusal or self.extra):  # a callback of ours broke: a bug
                raise
        except httptools.HttpParserError as exc:
            self._fail(f"invalid HTTP answer: {exc}"[:200])
            return
        if self.refusal:
            self.busy = False
            self.abort()
            self.owner.refused(self.refusal)
        elif self.complete:
            self.busy = False
            self.reused = True
            if not self.keep or self.extra:
                self.abort()
                self.owner.lost(self)
            else:
                self.pool.idle(self)
            body = self.body
            self.owner.answered(self.status, body if type(body) is bytes else bytes(body))
        elif self.head and not 200 <= self.status < 300:
            self.busy = False  # the body of a non-2xx answer is not read: drop the rest
            self.abort()
            self.owner.answered(self.status, None)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.release(self)
        if not self.busy:
            self.owner.lost(self)
            return
        self.busy = False
        if self.head and 200 <= self.status < 300 and self.length < 0 and not self.chunked:
            self.owner.lost(self)  # a body delimited by the end of the connection: complete
            body = self.body
            self.owner.answered(self.status, body if type(body) is bytes else bytes(body))
            return
        self.owner.lost(self)
        if isinstance(exc, OSError):
            detail = f"ClientOSError: {exc}"
        elif self.head:
            detail = "ClientPayloadError: Response payload is not completed"
        else:
            detail = DISCONNECTED
        self.owner.failed(detail, self.reused and not self.got)

    def _fail(self, detail: str) -> None:
        self.busy = False
        self.abort()
        self.owner.lost(self)
        self.owner.failed(detail, False)

    # --- llhttp callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-length":
            self.length = int(value)
        elif n == b"content-encoding":
            if not self.encoding:  # the first one, as aiohttp's headers.get() saw it
                self.encoding = value.strip().lower() or b"identity"
        elif n == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.head = True
        status = self.status = self.parser.get_status_code()
        if not 200 <= status < 300:
            return
        encoding = self.encoding
        if encoding not in _IDENTITY:
            shown = encoding.decode("latin-1")[:40]
            self.refusal = f"compressed body refused (Content-Encoding {shown})"
            raise _Stop
        if self.length > self.cap:
            self.refusal = f"body too large (limit {self.cap} bytes)"
            raise _Stop

    def on_body(self, chunk: bytes) -> None:
        if not 200 <= self.status < 300:
            return  # not read (discarded with the connection unless it ends right here)
        body = self.body
        if len(body) + len(chunk) > self.cap:
            self.refusal = f"body too large (limit {self.cap} bytes)"
            raise _Stop
        if not body:
            self.body = chunk  # most answers: one piece, no copy
        elif type(body) is bytes:
            self.body = bytearray(body) + chunk
        else:
            body += chunk

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: no server we can talk to
            self.extra = True
            raise _Stop

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep = self.parser.should_keep_alive()  # (only known in here)


class Pool:
    """At most ``cap`` connections open (or opening) at once, over all masters."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0  # places taken: connections open or being opened
        self._idle: dict[Conn, None] = {}  # idle connections, least recently used first
        self._waiting: deque[Waiter] = deque()

    def reserve(self, waiter: Waiter) -> bool:
        """A place for a new connection now (True), else ``waiter.granted()`` is called once
        one frees up; ``waiter.waiting`` turned False meanwhile withdraws it."""
        if self.open < self.cap:
            self.open += 1
            return True
        if self._idle:  # close the least recently used idle connection; its place is ours
            victim = next(iter(self._idle))
            del self._idle[victim]
            victim.counted = False
            victim.abort()
            return True
        self._waiting.append(waiter)
        return False

    def unreserve(self) -> None:
        """A reserved place not used after all (the connect failed or was cancelled)."""
        self.open -= 1
        self._hand_over()

    def idle(self, conn: Conn) -> None:
        waiting = self._waiting
        while waiting and not waiting[0].waiting:  # withdrawn (timed out meanwhile)
            waiting.popleft()
        if waiting and self.open >= self.cap:  # someone needs the place more
            conn.abort()
            conn.owner.lost(conn)
            return
        self._idle[conn] = None

    def taken(self, conn: Conn) -> None:
        self._idle.pop(conn, None)

    def release(self, conn: Conn) -> None:
        """The connection is closed (idempotent)."""
        self._idle.pop(conn, None)
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._hand_over()

    def _hand_over(self) -> None:
        while self._waiting and self.open < self.cap:
            waiter = self._waiting.popleft()
            if waiter.waiting:
                self.open += 1
                waiter.granted()

    def shrink(self) -> None:
        """After the cap was lowered: close idle connections down to it."""
        while self.open > self.cap and self._idle:
            victim = next(iter(self._idle))
            victim.abort()
            victim.owner.lost(victim)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting_count(self) -> int:
        return sum(w.waiting for w in self._waiting)


class Waiter(Protocol):
    waiting: bool

    def granted(self) -> None: ...
