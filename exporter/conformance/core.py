"""The parts every conformance check uses: results, bounded HTTP calls, schema validation.

A master under test is a stranger: every call has a timeout, no redirect is followed, and no
answer is read past a cap, so a hung or hostile master makes checks fail, never hang the tool.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import aiohttp
import jsonschema

from exporter.conformance.schemas import validator_root

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 5.0
BODY_CAP = 1 << 20  # every answer but a snapshot
HEALTH_CAP = 64 << 10  # the exporter's default probe cap: a larger /health fails its probes
STATE_CAP = 64 << 20
_READ_CHUNK = 1 << 16


class Failed(Exception):
    """A requirement is not met; the message says why, for the FAIL line."""


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    what: str
    ok: bool
    why: str = ""

    def line(self) -> str:
        if self.ok:
            return f"PASS {self.id} {self.what}"
        return f"FAIL {self.id} {self.what}: {self.why}"


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer, body read in full (within its cap)."""

    method: str
    path: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def call(self) -> str:
        return f"{self.method} {self.path}"

    def excerpt(self) -> str:
        text = self.body[:120].decode("utf-8", "replace")
        return repr(text) if text else "(empty body)"

    def expect(self, *statuses: int) -> Answer:
        """This answer if its status is one of ``statuses``; Failed naming both otherwise."""
        if self.status not in statuses:
            wanted = " or ".join(str(s) for s in statuses)
            raise Failed(f"{self.call} answered {self.status}, expected {wanted}: "
                         f"{self.excerpt()}")
        return self

    def json(self) -> Any:
        """The body as strict JSON (NaN and Infinity refused: they are not JSON)."""
        try:
            return json.loads(self.body, parse_constant=_no_constant)
        except RecursionError:
            raise Failed(f"{self.call}: body nested too deep") from None
        except ValueError as exc:
            raise Failed(f"{self.call}: body is not JSON ({exc}): {self.excerpt()}") from None

    def valid(self, schema: str) -> Any:
        """The JSON body, validated against ``schema``."""
        data = self.json()
        validate(schema, data, self.call)
        return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


@cache
def _validator(schema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(validator_root(schema))


def validate(schema: str, data: Any, where: str) -> None:
    """Failed with the most relevant schema error, naming the field."""
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(data))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "(the body)"
        raise Failed(f"{where}: not a valid {schema}: {at}: {error.message}"[:300])


class Client:
    """Bounded calls to one master; ``epoch`` goes out as X-HA-Epoch when asked for."""

    def __init__(self, session: aiohttp.ClientSession, base: str,
                 timeout: float = CALL_TIMEOUT) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.timeout = timeout

    async def call(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   headers: Mapping[str, str] | None = None, epoch: int | None = None,
                   cap: int = BODY_CAP) -> Answer:
        """One request; Failed on a timeout, a connection error or a body over ``cap``."""
        out = dict(headers or {})
        if epoch is not None:
            out["X-HA-Epoch"] = str(epoch)
        if body is not None:
            raw = json.dumps(body).encode()
        if raw is not None:
            out.setdefault("Content-Type", "application/json")
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.request(method, self.base + path, data=raw,
                                                headers=out, allow_redirects=False) as resp:
                    data = await _read_capped(resp, cap, f"{method} {path}")
                    return Answer(method, path, resp.status, resp.headers.copy(), data)
        except TimeoutError:
            raise Failed(f"{method} {path}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise Failed(f"{method} {path}: {type(exc).__name__}: {exc}") from None


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, call: str) -> bytes:
    if resp.content_length is not None and resp.content_length > cap:
        raise Failed(f"{call}: body of {resp.content_length} bytes, over the {cap} byte cap")
    body = bytearray()
    while chunk := await resp.content.read(min(_READ_CHUNK, cap + 1 - len(body))):
        body += chunk
        if len(body) > cap:
            raise Failed(f"{call}: body over the {cap} byte cap")
    return bytes(body)


@dataclass
class Report:
    """The results so far, in the order the requirements were checked."""

    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def passed(self, rid: str, what: str) -> None:
        self.results.append(Result(rid, what, True))

    def failed(self, rid: str, what: str, why: str) -> None:
        self.results.append(Result(rid, what, False, why))

    async def check(self, rid: str, what: str, run: Callable[[], Awaitable[T]]) -> T | None:
        """Run one requirement; its value when it passes, None (and a FAIL line) when not."""
        try:
            value = await run()
        except Failed as exc:
            self.failed(rid, what, str(exc))
            return None
        except Exception as exc:  # a fault of the checker still gets its line, and the rest run
            log.exception("conformance check %s crashed", rid)
            self.failed(rid, what, f"internal error of the checker: {exc!r}")
            return None
        self.passed(rid, what)
        return value

    def skip(self, rid: str, what: str, because: str) -> None:
        """A requirement that could not be checked fails: conformance is not shown."""
        self.failed(rid, what, f"not checked: {because}")


def require(condition: bool, why: str) -> None:
    if not condition:
        raise Failed(why)
