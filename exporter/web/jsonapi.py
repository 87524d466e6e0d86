"""What every JSON endpoint shares: the response encoder, the error a handler raises, and
request bodies parsed into pydantic models that refuse anything they do not declare."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails


class ApiError(Exception):
    """A request the web layer refuses; answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200) -> web.Response:
    """``default=str`` so records holding timestamps or enums still encode."""
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


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


async def read_body(request: web.Request, model: type[B]) -> B:
    """The request body as ``model``, or a 400 naming each offending field.

    An empty body counts as ``{}``; a body over ``client_max_size`` raises aiohttp's 413,
    which the error middleware answers as JSON.
    """
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "; ".join(_describe(e) for e in exc.errors())) from None
