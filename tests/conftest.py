"""Shared fixtures: the harness of tests.support and tests.processes, stopped in any case.

``http``       an aiohttp session (30 s per request at most: a hang fails, it does not block)
``processes``  child processes of the test (`ha-exporter master`/`run`, anything else)
``stack``      ``await stack(specs, **sections)``: masters + exporter, started (tests.processes)

A failed test gets the tail of every ``*.log`` under its tmp_path (each child's output) in
its report, so that a failure shows what the processes said.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import Processes, Spec, Stack, StartStack

LOG_TAIL = 4000


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[StartStack]:
    """``await stack(specs, drain=..., **sections)``: a started Stack in tmp_path (a second one
    in tmp_path/stack-2, ...), stopped at the end of the test in any case."""
    stacks: list[Stack] = []

    async def start(specs: Sequence[Spec], **kwargs: Any) -> Stack:
        tmp = tmp_path if not stacks else tmp_path / f"stack-{len(stacks) + 1}"
        tmp.mkdir(exist_ok=True)
        started = Stack(tmp, specs, **kwargs)
        stacks.append(started)
        return await started.start()

    try:
        yield start
    finally:
        for s in stacks:
            s.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.rglob("*.log")):
            text = log.read_text(errors="replace")
            if text:
                report.sections.append(
                    (f"{log.relative_to(tmp)} (last {LOG_TAIL} chars)", text[-LOG_TAIL:])
                )
    return report
