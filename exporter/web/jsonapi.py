"""What every JSON endpoint shares: the response encoder, the error a handler raises, and
request bodies parsed into pydantic models that refuse anything they do not declare."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

#: Deepest nesting a request body may have. Every body is a flat object, so this is generous;
#: the bound matters because json.loads recurses once per level.
MAX_BODY_DEPTH = 32
#: Seconds a client has to deliver the body it announced.
BODY_TIMEOUT = 10.0
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class ApiError(Exception):
    """A request the web layer refuses; answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """``default=str`` so records holding timestamps or enums still encode."""
    return web.json_response(data, status=status, headers=headers,
                             dumps=lambda o: json.dumps(o, default=str))


class Body(BaseModel):
    """Base of every request body: unknown keys are an error (a typo must not be silently
    ignored on an operator action) and no type coercion ("yes" is not a boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoBody(Body):
    """For actions that take no arguments: an empty body or ``{}``."""


B = TypeVar("B", bound=Body)


def _describe(err: ErrorDetails) -> str:
    where = ".".join(["body", *(str(part) for part in err["loc"])])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        what = "unexpected field"
    elif kind == "missing":
        what = "required field missing"
    elif kind == "value_error" and "error" in ctx:
        what = str(ctx["error"])  # a validator's own sentence, without pydantic's prefix
    else:
        what = err["msg"][:1].lower() + err["msg"][1:]
    return f"{where}: {what}"


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in JSON text ``raw`` nest deeper than ``limit``: one linear
    pass over the brackets outside strings, no recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def parse_json(raw: bytes) -> Any:
    """``raw`` decoded, or a 400: not JSON, or nested deeper than MAX_BODY_DEPTH."""
    if too_deep(raw, MAX_BODY_DEPTH):
        raise ApiError(400, f"body nested too deep (limit {MAX_BODY_DEPTH} levels)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"body nested too deep (limit {MAX_BODY_DEPTH} levels)") from None
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None


async def read_body(request: web.Request, model: type[B]) -> B:
    """The request body as ``model``, or a 400 naming each offending field.

    An empty body counts as ``{}``; a body over ``client_max_size`` raises aiohttp's 413,
    which the error middleware answers as JSON; a body not complete within BODY_TIMEOUT is a
    408, a malformed one (bad chunked encoding) a 400.
    """
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"request body not received within {BODY_TIMEOUT:g} s") from None
    except web.RequestPayloadError as exc:
        raise ApiError(400, f"malformed request body: {exc}") from None
    except ConnectionError:  # the client left; nobody reads this answer, nothing to log
        raise ApiError(400, "connection closed before the body was complete") from None
    data: Any = parse_json(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "; ".join(_describe(e) for e in exc.errors())) from None
