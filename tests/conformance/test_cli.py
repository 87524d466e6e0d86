"""`ha-exporter conformance`: passes on the simulated master, in-process and as a real
process, and fails on masters that break the protocol, naming the requirement."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from exporter import cli
from exporter.conformance.checks import READ_ONLY
from exporter.conformance.destructive import REQUIREMENTS
from exporter.sim import SimulatedMaster, create_app
from tests.conformance import broken
from tests.processes import Processes, exporter_cli
from tests.support import closed_port, serve_app

ALL = len(READ_ONLY) + len(REQUIREMENTS)


async def conformance(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """``ha-exporter conformance ARGS`` through ``cli.main`` (its own event loop, in a
    thread: the masters are served on this one); exit code and stdout lines."""
    rc = await asyncio.to_thread(cli.main, ["conformance", *args])
    return rc, capsys.readouterr().out.splitlines()


def failed(lines: list[str]) -> dict[str, str]:
    return {line.split()[1]: line for line in lines if line.startswith("FAIL ")}


async def test_the_simulated_master_conforms_read_only_and_is_left_untouched(capsys):
    m = SimulatedMaster("m1", "uae", "active")
    async with serve_app(create_app(m)) as url:
        rc, lines = await conformance(capsys, url)
    assert rc == 0, lines
    assert [line.split()[:2] for line in lines] == [["PASS", rid] for rid, _ in READ_ONLY]
    assert (m.active, m.duties, m.imported, m.epoch) == (True, ["m1"], {}, None)


@pytest.mark.parametrize("role", ["active", "standby"])
async def test_the_simulated_master_conforms_destructively_and_is_restored(capsys, role):
    m = SimulatedMaster("m1", "uae", role)
    before = (m.active, list(m.duties))
    async with serve_app(create_app(m)) as url:
        rc, lines = await conformance(capsys, url, "--destructive")
    assert rc == 0, lines
    assert len(lines) == ALL and all(line.startswith("PASS ") for line in lines)
    assert lines[-1].startswith("PASS restore.activity ")
    assert ((m.active, m.duties), m.imported, m.epoch) == (before, {}, 1)


async def test_the_masters_own_epoch_is_reused_and_a_lower_one_is_reported(capsys):
    m = SimulatedMaster("m1")
    m.epoch = 41
    async with serve_app(create_app(m)) as url:
        rc, _ = await conformance(capsys, url, "--destructive")
        assert rc == 0 and m.epoch == 41  # its fencing state is as it was
        rc, lines = await conformance(capsys, url, "--destructive", "--epoch", "7")
    assert rc == 1
    assert "refused epoch 7 as stale" in failed(lines)["import.accepts"]
    assert "--epoch" in failed(lines)["import.accepts"]
    assert (m.active, m.duties, m.epoch) == (True, ["m1"], 41)  # nothing was obeyed


async def test_the_command_passes_as_a_real_process_on_a_real_master(processes: Processes):
    master = await processes.master("m1")
    proc = await asyncio.create_subprocess_exec(
        *exporter_cli("conformance", master.url or "", "--destructive"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert proc.returncode == 0, (lines, err.decode()[-2000:])
    assert len(lines) == ALL and all(line.startswith("PASS ") for line in lines)
    assert f"{ALL} requirements, 0 failed" in err.decode()


@pytest.mark.parametrize("kind", sorted(broken.KINDS))
async def test_a_broken_master_fails_naming_the_requirement(capsys, kind):
    rid, why = broken.KINDS[kind]
    async with serve_app(broken.app(kind)) as url:
        rc, lines = await conformance(capsys, url, "--destructive")
    assert rc == 1
    assert rid in failed(lines), lines
    assert why in failed(lines)[rid], failed(lines)[rid]
    assert len(lines) == ALL  # one line per requirement, whatever failed


async def test_a_hung_master_fails_within_the_timeouts(capsys):
    m = SimulatedMaster("m1")
    m.set_chaos("hang")
    async with serve_app(create_app(m)) as url:
        started = time.monotonic()
        rc, lines = await conformance(capsys, url, "--timeout", "0.3")
    assert rc == 1 and time.monotonic() - started < 10
    assert "no answer within 0.3s" in failed(lines)["health.answers"]
    assert "not checked" in failed(lines)["health.schema"]


async def test_a_huge_health_answer_is_not_read_past_the_cap(capsys):
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pad": "x" * (1 << 20)})

    app = web.Application()
    app.router.add_get("/health", health)
    async with serve_app(app) as url:
        rc, lines = await conformance(capsys, url)
    assert rc == 1 and "byte cap" in failed(lines)["health.answers"]


async def test_an_unreachable_master_fails_every_requirement(capsys):
    rc, lines = await conformance(capsys, f"http://127.0.0.1:{closed_port()}", "--destructive")
    assert rc == 1 and len(lines) == ALL and len(failed(lines)) == ALL
    assert "restored" in failed(lines)["import.accepts"]


@pytest.mark.parametrize("args", [["ftp://example.org"], ["127.0.0.1:9201"],
                                  ["http://h:9201/?x=1"], ["http://h:99999"]])
def test_a_bad_url_is_a_usage_error(capsys, args):
    assert cli.main(["conformance", *args]) == 2
    assert "conformance:" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--epoch", "0"], ["--epoch", "x"], ["--timeout", "-1"],
                                  ["--timeout", "nan"], []])
def test_bad_options_are_usage_errors(args):
    url = [] if not args else ["http://127.0.0.1:9"]
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["conformance", *url, *args])
    assert exited.value.code == 2
