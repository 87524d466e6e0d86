"""/metrics as Prometheus sees it: every contract family with its labels, promtool-clean."""

from __future__ import annotations

import logging
import math
import subprocess

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import MasterConfig, ProbeConfig, parse_config
from exporter.fleet import Fleet, Outcome, Result
from exporter.metrics import (
    OM_CONTENT_TYPE,
    ExporterMetrics,
    FleetCollector,
    escape,
    fmt,
    sample_value,
)
from exporter.routing.router import Router
from exporter.service import Service
from exporter.web.server import running
from tests.support import serve_app, wait_for
from tests.tools import require_binary

PER_MASTER = {
    "ha_master_up": {"master", "region", "role"},
    "ha_master_state": {"master", "state"},
    "ha_master_probe_duration_seconds": {"master"},
    "ha_master_probes": {"master", "result"},
    "ha_master_consecutive_failures": {"master"},
    "ha_master_last_probe_timestamp_seconds": {"master"},
    "ha_master_info": {"master", "region", "role", "priority"},
    "ha_master_queue_length": {"master"},
    "ha_master_active_messages": {"master"},
    "ha_master_cpu_percent": {"master"},
    "ha_master_memory_percent": {"master"},
    "ha_master_routing_weight": {"master"},
}
FROM_PAYLOAD = {
    "ha_master_queue_length",
    "ha_master_active_messages",
    "ha_master_cpu_percent",
    "ha_master_memory_percent",
}  # absent until a master reports them
FLEET_LEVEL = {
    "ha_fleet_health_score",
    "ha_config_last_reload_success",
    "ha_build_info",
    "ha_failover_in_progress",
    "ha_load_distribution_quality",
}
DECLARED = {"ha_route_decisions", "ha_failovers", "ha_failover_duration_seconds", "ha_rebalances"}


def health_app() -> web.Application:
    async def health(request: web.Request) -> web.Response:
        if request.match_info["who"] == "dead":
            return web.json_response({"status": "down"})
        return web.json_response(
            {
                "status": "ok",
                "queue_length": 4,
                "active_messages": 2,
                "cpu_percent": 21.5,
                "memory_percent": 33.0,
            }
        )

    app = web.Application()
    app.router.add_get("/{who}/health", health)
    return app


async def scrape_service(tmp_path, accept: str | None = None) -> tuple[str, str]:
    async with serve_app(health_app()) as url:
        cfg = parse_config(
            {
                "state_path": str(tmp_path / "state.db"),
                "probe": {"interval": "300ms", "timeout": "200ms", "failure_threshold": 1},
                "masters": [
                    {"name": "alpha", "url": f"{url}/alpha", "region": "uae", "priority": 1},
                    {"name": 'we"ird\\name', "url": f"{url}/weird", "region": "usa"},
                    {"name": "dead", "url": f"{url}/dead", "region": "usa", "role": "standby"},
                ],
            }
        )
        svc = Service(cfg, token="t")
        async with running(svc, "127.0.0.1", 0) as server:
            base = f"http://127.0.0.1:{server.port}"
            async with aiohttp.ClientSession() as s:

                async def failed() -> bool:
                    async with s.get(f"{base}/api/v1/masters/dead") as r:
                        return (await r.json())["state"] == "failed"

                await wait_for(failed, 5, "the down master to be failed")
                headers = {"Accept": accept} if accept else {}
                async with s.get(f"{base}/metrics", headers=headers) as r:
                    return await r.text(), r.headers["Content-Type"]


async def test_scrape_has_every_contract_metric_with_its_labels(tmp_path):
    text, ctype = await scrape_service(tmp_path)
    assert ctype.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, labels in PER_MASTER.items():
        fam = families.get(name)
        assert fam is not None and fam.samples, f"{name} missing"
        for sample in fam.samples:
            assert labels <= set(sample.labels), (name, sample.labels)
        expected = {"alpha"} if name in FROM_PAYLOAD else {"alpha", "dead"}
        assert {s.labels["master"] for s in fam.samples} >= expected, name
    for name in FLEET_LEVEL:
        assert families[name].samples, name
    for name in DECLARED:
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert (
        samples[("ha_master_up", (("master", "dead"), ("region", "usa"), ("role", "standby")))] == 0
    )
    assert samples[("ha_master_state", (("master", "dead"), ("state", "failed")))] == 1
    assert samples[("ha_master_probes_total", (("master", "dead"), ("result", "unhealthy")))] >= 1
    assert samples[("ha_master_queue_length", (("master", "alpha"),))] == 4
    assert samples[("ha_master_state", (("master", 'we"ird\\name'), ("state", "healthy")))] == 1
    assert 0 < samples[("ha_fleet_health_score", ())] < 100
    help_line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("# HELP ha_master_last_probe_timestamp_seconds")
    )
    assert "probe schedule" in help_line and "not from this scrape" in help_line


async def test_openmetrics_when_asked(tmp_path):
    text, ctype = await scrape_service(tmp_path, "application/openmetrics-text; version=1.0.0")
    assert ctype == OM_CONTENT_TYPE
    assert text.endswith("# EOF\n")
    assert "# TYPE ha_master_probes counter" in text


async def test_promtool_check_metrics_is_clean(tmp_path):
    promtool = require_binary("promtool")
    text, _ = await scrape_service(tmp_path)
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""


def test_escaping_and_number_format():
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert fmt(3) == "3" and fmt(0.25) == "0.25"
    assert fmt(float("inf")) == "+Inf" and fmt(float("nan")) == "NaN"


def test_huge_and_odd_numbers_are_written_validly():
    assert fmt(10**20) == "1e+20" and fmt(-(10**400)) == "-Inf"
    assert sample_value(2**53) == str(2**53) and sample_value(0.5) == "0.5"
    assert sample_value(float("nan")) == "NaN"
    for bad in (10**400, float("inf"), "12", None):
        with pytest.raises(ValueError):
            sample_value(bad)


class _BrokenCollector:
    def collect(self):
        raise RuntimeError("collector bug")


def broken_metrics() -> ExporterMetrics:
    """Every kind of failure a scrape can meet, at once."""
    fleet = Fleet(
        [MasterConfig(name=n, url="http://127.0.0.1:9") for n in ("fine", "odd", "broken")],
        ProbeConfig(),
        5,
    )
    _, odd, broken = fleet
    for rt in fleet:
        payload = {"status": "ok", "queue_length": 4, "cpu_percent": 10.0}
        rt.apply(Outcome(Result.SUCCESS, 0.01, payload=payload), 1000.0)
    odd.queue_length = 10**400  # only a bug could put these here; still no broken scrape
    odd.cpu_percent = float("inf")
    odd.memory_percent = "lots"  # type: ignore[assignment]
    broken.health = None  # type: ignore[assignment]  # every family reading it fails

    def failing() -> float:
        raise OverflowError("(34, 'Numerical result out of range')")

    collector = FleetCollector(
        fleet=lambda: fleet,
        weights=failing,  # type: ignore[arg-type]
        decisions=lambda: {("fine", "geo"): 3, ("odd", "geo"): float("inf")},
        checkpoint_ages=lambda now: {"fine": 2.5},
        recovery_timeout=lambda: 30.0,
        role_of=lambda name: "active",
    )
    metrics = ExporterMetrics(collector)
    metrics.fleet_health_score.set_function(failing)
    metrics.load_distribution_quality.set_function(lambda: 10**400)
    metrics.failover_in_progress.set_function(lambda: float("inf"))
    metrics.failover_paused.set_function(lambda: 1)
    metrics.add_collector(_BrokenCollector(), "broken")
    return metrics


def test_failing_callbacks_never_break_a_scrape(caplog):
    metrics = broken_metrics()
    for _ in range(3):  # three scrapes: each failure is logged once, not per scrape
        body, _ = metrics.render(None)
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    for name in (
        "ha_fleet_health_score",
        "ha_load_distribution_quality",
        "ha_failover_in_progress",
    ):
        assert math.isnan(values[(name, ())]), name
    assert values[("ha_failover_paused", ())] == 1
    assert values[("ha_master_queue_length", (("master", "fine"),))] == 4
    for name in ("ha_master_queue_length", "ha_master_cpu_percent", "ha_master_memory_percent"):
        assert math.isnan(values[(name, (("master", "odd"),))]), name
    assert not families["ha_master_routing_weight"].samples  # its input failed: dropped
    assert values[("ha_master_checkpoint_age_seconds", (("master", "fine"),))] == 2.5
    assert ("ha_master_consecutive_failures", (("master", "broken"),)) in values  # NaN
    assert not any(
        dict(lab).get("master") == "broken" and name == "ha_master_state" for name, lab in values
    )
    assert (
        values[("ha_master_up", (("master", "broken"), ("region", "default"), ("role", "active")))]
        == 1
    )
    decisions = {s.labels["master"]: s.value for s in families["ha_route_decisions"].samples}
    assert decisions == {"fine": 3}  # a counter cannot be NaN: the bad sample is dropped
    assert "process_cpu_seconds_total" in text or "python_info" in text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    keys = [r.getMessage().split(":")[0] for r in errors]
    assert len(keys) == len(set(keys)), keys  # once per failing metric, not per scrape
    assert len(errors) >= 8

    om_body, _ = metrics.render("application/openmetrics-text; version=1.0.0")
    om_families = list(om_parser.text_string_to_metric_families(om_body.decode()))
    assert {f.name for f in om_families} >= {"ha_fleet_health_score", "ha_master_up"}

    promtool = require_binary("promtool")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""


async def test_an_overflowing_gauge_callback_is_nan_not_a_500(tmp_path, monkeypatch):
    """The path of the 1e200 queue: the balancing quality overflowed inside a gauge callback
    and turned every scrape into a 500."""

    def overflow(self) -> float:
        raise OverflowError("(34, 'Numerical result out of range')")

    monkeypatch.setattr(Router, "distribution_quality", overflow)
    text, _ = await scrape_service(tmp_path)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert math.isnan(families["ha_load_distribution_quality"].samples[0].value)
    assert families["ha_master_up"].samples
