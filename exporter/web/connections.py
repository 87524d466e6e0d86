"""Client connections: how many, for how long, and what a request aiohttp cannot parse gets.

Every accepted socket holds a file descriptor, and the probes share the process's fd limit.
So the server bounds the connections it holds:

* a connection must deliver its first request head within ``request_head_timeout`` (a client
  that connects and says nothing, or trickles its headers, is closed);
* a kept-alive connection idle for ``keepalive_timeout`` is closed (aiohttp's own timer);
* at most ``max_connections`` are open at once. A new connection beyond that closes the oldest
  idle one (a socket that never sent a request first, then a kept-alive one), so a flood of
  idle sockets cannot lock out a scraper; only when every connection is busy with a request is
  the new one closed at once. Either is reported by one warning line per ``report_every``
  seconds with counts, never per connection.

aiohttp answers a request its parser rejects (request line or headers too long, too many
headers, a malformed request line) before any middleware runs, as text and with a traceback
in the log. ``GuardedRequestHandler.handle_error`` answers JSON ``{"error": ...}`` with the
status that fits (400, 414, 431) and logs such requests at debug level only.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from exporter.web.headers import add_security_headers
from exporter.web.jsonapi import json_response

log = logging.getLogger(__name__)

RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter,
     "asyncio.Task[None]"],
    web.BaseRequest,
]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on the exporter's HTTP connections and request heads.

    ``max_request_line`` and ``max_header_field`` differ on purpose: aiohttp reports both as
    the same error, and the limit it names tells a too-long URL (414) from a too-long header
    (431).
    """

    #: Client connections held at once; well below the usual 1024 open files.
    max_connections: int = 512
    #: Seconds from accept to a complete first request line and headers.
    request_head_timeout: float = 10.0
    #: Seconds a kept-alive connection may sit idle between requests.
    keepalive_timeout: float = 60.0
    #: Bytes of the request target (414 beyond).
    max_request_line: int = 4096
    #: Bytes of one header line (431 beyond).
    max_header_field: int = 8190
    #: Header lines per request (431 beyond).
    max_headers: int = 100
    #: Seconds between two warnings about the connection limit.
    report_every: float = 10.0
    #: Never hold more than this share of the process's open-files limit in client sockets.
    fd_share: float = 0.5

    def effective_max_connections(self) -> int:
        """``max_connections``, lowered when the open-files limit is too small to hold them
        beside the probes, the state store and the log."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft <= 0:
            return self.max_connections
        return max(1, min(self.max_connections, int(soft * self.fd_share)))


class LimitReport:
    """One warning line per ``every`` seconds about connections the limit closed: the first
    event is reported at once, later ones summed into the next line."""

    def __init__(self, limit: int, every: float) -> None:
        self.limit, self.every = limit, every
        self.evicted = self.refused = 0
        self.total_evicted = self.total_refused = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, *, evicted: int = 0, refused: int = 0) -> None:
        self.evicted += evicted
        self.refused += refused
        self.total_evicted += evicted
        self.total_refused += refused
        if self._timer is None:
            self._emit()
            self._timer = asyncio.get_running_loop().call_later(self.every, self._due)

    def _due(self) -> None:
        self._timer = None
        if self.evicted or self.refused:
            self._emit()
            self._timer = asyncio.get_running_loop().call_later(self.every, self._due)

    def _emit(self) -> None:
        log.warning(
            "connection limit of %d reached: closed %d idle connections and refused %d new "
            "ones (reported at most every %.0f s)",
            self.limit, self.evicted, self.refused, self.every,
        )
        self.evicted = self.refused = 0

    def close(self) -> None:
        """Stop the timer; what it would still have reported is reported now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.evicted or self.refused:
            self._emit()


class ConnectionGuard:
    """The open client connections, oldest first, and the admission rule for a new one."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.max_connections = limits.effective_max_connections()
        self.report = LimitReport(self.max_connections, limits.report_every)
        self._open: dict[GuardedRequestHandler, None] = {}

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Register ``conn``; at the limit make room by closing the oldest idle connection,
        or refuse ``conn`` (False) when none is idle."""
        if len(self._open) >= self.max_connections:
            victim = self._idle_victim()
            if victim is None:
                self.report.note(refused=1)
                return False
            del self._open[victim]
            victim.force_close()
            self.report.note(evicted=1)
        self._open[conn] = None
        return True

    def release(self, conn: GuardedRequestHandler) -> None:
        self._open.pop(conn, None)

    def _idle_victim(self) -> GuardedRequestHandler | None:
        kept_alive = None
        for conn in self._open:
            if conn.busy:
                continue
            if conn.requests == 0:
                return conn
            if kept_alive is None:
                kept_alive = conn
        return kept_alive


def _parser_error(exc: BaseException | None, handler: web.RequestHandler) -> tuple[int, str]:
    """Status and message for a request aiohttp's parser rejected."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == handler.max_line_size:
            return 414, f"request line too long (limit {limit} bytes)"
        return 431, f"request header field too long (limit {limit} bytes)"
    if isinstance(exc, HttpProcessingError) and "too many headers" in exc.message.lower():
        return 431, f"too many request headers (limit {handler.max_headers})"
    if isinstance(exc, BadHttpMethod):
        return 400, "malformed request line: invalid method"
    if isinstance(exc, BadStatusLine):
        return 400, "malformed request line"
    if isinstance(exc, InvalidURLError):
        return 400, "malformed request target"
    if isinstance(exc, InvalidHeader):
        return 400, "malformed request header"
    detail = exc.message if isinstance(exc, HttpProcessingError) else ""
    first = next((ln.strip().rstrip(":") for ln in detail.splitlines() if ln.strip()), "")
    return 400, f"malformed request: {first[:120]}" if first else "malformed request"


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, registered with a ConnectionGuard, with a deadline for
    the first request head and JSON error answers."""

    def __init__(
        self, manager: web.Server, guard: ConnectionGuard, *,
        loop: asyncio.AbstractEventLoop, **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self.guard = guard
        self.admitted = False
        self.busy = False
        self.requests = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(self):
            transport.close()
            return
        self.admitted = True
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_later(
            self.guard.limits.request_head_timeout, self._head_overdue
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.admitted:
            return
        self.guard.release(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def request_started(self) -> None:
        """Called as a request head is complete: the connection is no longer idle."""
        self.busy = True
        self.requests += 1
        self._cancel_head_timer()

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """aiohttp calls this once a response is written: the connection is idle again."""
        self.busy = False
        super().log_access(request, response, time)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.requests == 0:
            log.debug("closing a connection that sent no request head within %.1f s",
                      self.guard.limits.request_head_timeout)
            self.force_close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """JSON instead of aiohttp's text; a client's malformed request is logged at debug
        level without a traceback, a server-side failure with one."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error instead")
        if status == 400:
            status, text = _parser_error(exc, self)
            log.debug("rejected a request from %s: %s (%r)", request.remote, text, exc)
        elif status == 504:
            text = "the request took too long"
            log.warning("request from %s timed out in its handler", request.remote)
        else:
            text = "internal error; see the exporter's log"
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        resp = json_response({"error": text}, status)
        add_security_headers(resp)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's connection factory, making GuardedRequestHandlers."""

    def __init__(
        self, handler: Handler, *, request_factory: RequestFactory, guard: ConnectionGuard,
        **handler_args: Any,
    ) -> None:
        super().__init__(handler, request_factory=self._start_request, **handler_args)
        self.guard = guard
        self._handler_args = handler_args
        self._inner_factory = request_factory

    def _start_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, GuardedRequestHandler):
            protocol.request_started()
        return self._inner_factory(message, payload, protocol, writer, task)

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            self, self.guard, loop=asyncio.get_running_loop(), **self._handler_args
        )


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server bounds its connections by ``limits``. No access log: a
    scrape every few seconds is not worth a line each."""

    def __init__(
        self, app: web.Application, limits: ConnectionLimits, *, shutdown_timeout: float = 2.0
    ) -> None:
        self.handler_args: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": limits.keepalive_timeout,
            "max_line_size": limits.max_request_line,
            "max_field_size": limits.max_header_field,
            "max_headers": limits.max_headers,
        }
        super().__init__(
            app, handle_signals=False, shutdown_timeout=shutdown_timeout, **self.handler_args
        )
        self.guard = ConnectionGuard(limits)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app up and freezes it
        return GuardedServer(
            plain.request_handler, request_factory=plain.request_factory, guard=self.guard,
            **self.handler_args,
        )

    async def cleanup(self) -> None:
        await super().cleanup()
        self.guard.report.close()
