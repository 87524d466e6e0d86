"""Security headers every response carries.

The JSON API and /metrics are never meant to be rendered, framed or to leak the URL they were
reached from, so the default policy forbids everything. The status page sets its own
``Content-Security-Policy`` (it needs its one stylesheet); the hook only fills in what a
handler did not set itself.
"""

from __future__ import annotations

from aiohttp import web

#: For anything but the status page: nothing may load, nothing may frame it.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": DEFAULT_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def page_csp(style_hashes: list[str]) -> str:
    """The policy of an HTML page whose only active content is inline ``<style>`` blocks with
    these sha256 hashes (base64): no script at all, no framing."""
    styles = " ".join(f"'sha256-{h}'" for h in style_hashes) or "'none'"
    return (
        f"default-src 'none'; style-src {styles}; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def add_security_headers(response: web.StreamResponse) -> None:
    """Fill in each security header the response does not set itself."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``Application.on_response_prepare`` hook: runs for every response the app sends,
    including aiohttp's own 404/405 and errors raised past the middlewares."""
    add_security_headers(response)
