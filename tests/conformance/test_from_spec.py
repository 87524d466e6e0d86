"""A master built from docs/protocol.md alone passes `ha-exporter conformance --destructive`."""

from __future__ import annotations

import asyncio

from exporter.cli import main
from tests.conformance.from_spec import app
from tests.support import serve_app


async def test_a_master_written_from_the_spec_alone_conforms(capsys):
    async with serve_app(app("spec-m1")) as url:
        # main runs its own event loop: in a thread, while this one serves the master
        rc = await asyncio.to_thread(main, ["conformance", url, "--destructive"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
