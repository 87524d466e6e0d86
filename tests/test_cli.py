"""The exporter as a process: detection of a killed master, signals, refusing to start."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import aiohttp
import pytest

from tests.processes import Processes, StartStack, exporter_cli
from tests.support import (
    TOKEN,
    TOKEN_ENV,
    closed_port,
    master_entry,
    metric_value,
    wait_for,
    write_config,
)


@pytest.fixture
async def fleet(stack: StartStack, http: aiohttp.ClientSession):
    fleet = await stack(
        [("master-a", "uae", "active", 1), ("master-b", "usa", "active", 2)],
        failover={"enabled": False},
    )
    await fleet.ready(http)
    return fleet


async def test_sigkilled_master_is_failed_on_metrics_within_the_bound(fleet, http):
    base = fleet.base
    interval, timeout, threshold = 0.5, 0.3, 3
    bound = threshold * interval + timeout + interval
    failed = 'ha_master_state{master="master-a",state="failed"}'
    assert await metric_value(http, base, failed) == 0
    fleet.masters["master-a"].kill(signal.SIGKILL)
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


async def test_sighup_reloads_and_sigterm_stops_cleanly(fleet, http):
    exporter, base, config = fleet.exporter, fleet.base, fleet.config
    config.write_text(config.read_text().replace("failure_threshold: 3", "failure_threshold: 4"))
    exporter.kill(signal.SIGHUP)
    await exporter.wait_output("config reloaded", 5, "reload logged")
    assert await metric_value(http, base, "ha_config_last_reload_success") == 1
    t0 = time.monotonic()
    exporter.kill(signal.SIGTERM)
    code = await asyncio.to_thread(exporter.wait, 10)
    assert code == 0 and time.monotonic() - t0 < 10
    assert "ha-exporter stopped" in exporter.output()
    assert TOKEN not in exporter.output()  # the token is never logged


def test_refuses_to_start_without_a_token(tmp_path):
    config = write_config(tmp_path, [master_entry("m", "http://127.0.0.1:1")])
    res = subprocess.run(
        exporter_cli("run", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 2
    assert TOKEN_ENV in res.stderr and "--insecure-no-auth" in res.stderr


async def test_insecure_no_auth_warns_at_start(tmp_path, processes: Processes):
    config = write_config(
        tmp_path, [master_entry("m", f"http://127.0.0.1:{closed_port()}")]
    )
    proc = await processes.exporter(config, "--insecure-no-auth", env={TOKEN_ENV: ""})
    await proc.wait_output("insecure-no-auth", 10, "the warning")
    assert "WARNING" in proc.output()
