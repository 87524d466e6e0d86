"""/metrics as Prometheus sees it: every contract family with its labels, promtool-clean."""

from __future__ import annotations

import subprocess

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import parse_config
from exporter.metrics import OM_CONTENT_TYPE, escape, fmt
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
