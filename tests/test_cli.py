"""The exporter as a process: detection of a killed master, signals, refusing to start."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.processes import TOKEN, Proc, start_exporter, start_master, write_config
from tests.support import free_port, metric_value, wait_for, wait_ready


@pytest.fixture
async def fleet(tmp_path):
    ports = [free_port(), free_port()]
    masters = [
        start_master(tmp_path, "master-a", ports[0]),
        start_master(tmp_path, "master-b", ports[1], region="usa"),
    ]
    config = write_config(
        tmp_path,
        [
            {
                "name": "master-a",
                "url": f"http://127.0.0.1:{ports[0]}",
                "priority": 1,
                "region": "uae",
            },
            {
                "name": "master-b",
                "url": f"http://127.0.0.1:{ports[1]}",
                "priority": 2,
                "region": "usa",
            },
        ],
        failover={"enabled": False},
    )
    exporter, base = start_exporter(tmp_path, config)
    procs = [*masters, exporter]
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, base)
            yield masters, exporter, base, config, http
    finally:
        for p in procs:
            p.stop()


async def test_sigkilled_master_is_failed_on_metrics_within_the_bound(fleet):
    masters, _exporter, base, _, http = fleet
    interval, timeout, threshold = 0.5, 0.3, 3
    bound = threshold * interval + timeout + interval
    failed = 'ha_master_state{master="master-a",state="failed"}'
    assert await metric_value(http, base, failed) == 0
    masters[0].kill(signal.SIGKILL)
    t0 = time.monotonic()

    async def is_failed() -> bool:
        return await metric_value(http, base, failed) == 1

    await wait_for(is_failed, bound + 5, "master-a failed on /metrics", poll=0.02)
    took = time.monotonic() - t0
    assert took <= bound + 0.1, f"detected after {took:.2f}s, bound {bound:.2f}s"
    up = 'ha_master_up{master="master-a",region="uae",role="active"}'
    assert await metric_value(http, base, up) == 0
    assert (
        await metric_value(
            http, base, 'ha_master_probes_total{master="master-a",result="connect_error"}'
        )
        >= 3
    )
    assert await metric_value(http, base, 'ha_master_state{master="master-b",state="healthy"}') == 1


async def test_sighup_reloads_and_sigterm_stops_cleanly(fleet):
    _masters, exporter, base, config, http = fleet
    config.write_text(config.read_text().replace("failure_threshold: 3", "failure_threshold: 4"))
    exporter.kill(signal.SIGHUP)

    async def reloaded() -> bool:
        return "config reloaded" in exporter.output()

    await wait_for(reloaded, 5, "reload logged")
    assert await metric_value(http, base, "ha_config_last_reload_success") == 1
    t0 = time.monotonic()
    exporter.kill(signal.SIGTERM)
    code = await asyncio.to_thread(exporter.wait, 10)
    assert code == 0 and time.monotonic() - t0 < 10
    assert "ha-exporter stopped" in exporter.output()
    assert TOKEN not in exporter.output()  # the token is never logged


def test_refuses_to_start_without_a_token(tmp_path):
    config = write_config(tmp_path, [{"name": "m", "url": "http://127.0.0.1:1"}])
    res = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 2
    assert "HA_TEST_TOKEN" in res.stderr and "--insecure-no-auth" in res.stderr


async def test_insecure_no_auth_warns_at_start(tmp_path):
    config = write_config(tmp_path, [{"name": "m", "url": f"http://127.0.0.1:{free_port()}"}])
    proc = Proc(
        ["run", "--config", str(config), "--insecure-no-auth"],
        tmp_path / "x.log",
        env={"HA_TEST_TOKEN": ""},
    )
    try:
        await wait_for(lambda: "insecure-no-auth" in proc.output(), 10, "the warning")
        assert "WARNING" in proc.output()
    finally:
        proc.stop()
