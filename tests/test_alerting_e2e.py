"""probe -> metric -> rule -> Alertmanager -> on-call webhook, on the real binaries.

The shipped deploy/prometheus/prometheus.yml and deploy/alertmanager/alertmanager.yml run here
with only addresses, paths and intervals substituted (asserted below). The rules are rendered
from the test's exporter config, as `ha-exporter render` does. The dashboards' queries then run
against the same live Prometheus.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from exporter.config import load_config
from exporter.rules import render
from tests.processes import start_exporter, start_master, write_config
from tests.support import free_port, wait_for
from tests.tools import dashboard_paths, dashboard_queries, metric_names, require_binary

ROOT = Path(__file__).resolve().parent.parent
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RECEIVER = ROOT / "deploy" / "oncall" / "receiver.py"
# Panels whose data must exist once the fleet has been scraped for a few seconds.
CORE_METRICS = {
    "ha_fleet_health_score", "ha_master_state", "ha_master_probe_duration_seconds_bucket",
    "ha_master_probes_total", "ha_master_queue_length", "ha_master_routing_weight",
    "ha_config_last_reload_success", "ha_build_info", "ha_master_up",
}


def substituted(path: Path, replacements: list[tuple[str, str]], out: Path) -> Path:
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} not in {path}"
        text = text.replace(old, new)
    out.write_text(text)
    return out


def only_differences(a: object, b: object, allowed: set[str], path: str = "") -> list[str]:
    """Leaf paths where two YAML documents differ, minus the allowed ones."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys()
                for d in only_differences(a.get(k), b.get(k), allowed, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in only_differences(x, y, allowed, f"{path}[{i}]")]
    if a == b or any(re.fullmatch(p, path) for p in allowed):
        return []
    return [path]


class Procs:
    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        out = log.open("wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.items.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.items:
            if p.poll() is None:
                p.kill()
                p.wait(5)


async def prom_query(http: aiohttp.ClientSession, prom: str, query: str) -> dict:
    async with http.get(f"{prom}/api/v1/query", params={"query": query}) as r:
        return await r.json()


async def test_master_down_pages_the_oncall_and_resolves(tmp_path):
    prometheus = require_binary("prometheus")
    alertmanager = require_binary("prometheus-alertmanager", "alertmanager")
    ports = {n: free_port() for n in ("master-a", "master-b", "master-c", "prom", "am", "hook")}
    masters = {
        "master-a": start_master(tmp_path, "master-a", ports["master-a"], "uae", "active"),
        "master-b": start_master(tmp_path, "master-b", ports["master-b"], "usa", "active"),
        "master-c": start_master(tmp_path, "master-c", ports["master-c"], "uae", "standby"),
    }
    config = write_config(
        tmp_path,
        [{"name": n, "url": f"http://127.0.0.1:{ports[n]}", "region": r, "role": role,
          "priority": i + 1}
         for i, (n, r, role) in enumerate([("master-a", "uae", "active"),
                                           ("master-b", "usa", "active"),
                                           ("master-c", "uae", "standby")])],
        failover={"enabled": False},
    )
    exporter, base = start_exporter(tmp_path, config)
    exporter_addr = base.removeprefix("http://")
    rules_dir = tmp_path / "rules"
    render(load_config(config), rules_dir)

    prom_yml = substituted(PROM_CONFIG, [
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("scrape_interval: 5s", "scrape_interval: 1s"),
        ("../../alert_rules/*.yml", f"{rules_dir}/*.yml"),
        ("127.0.0.1:9108", exporter_addr),
        ("127.0.0.1:9093", f"127.0.0.1:{ports['am']}"),
        ("127.0.0.1:9090", f"127.0.0.1:{ports['prom']}"),
    ], tmp_path / "prometheus.yml")
    am_yml = substituted(AM_CONFIG, [
        ("127.0.0.1:9099", f"127.0.0.1:{ports['hook']}"),
        ("group_wait: 5s ", "group_wait: 1s "),
        ("group_interval: 30s", "group_interval: 2s"),
    ], tmp_path / "alertmanager.yml")
    assert only_differences(yaml.safe_load(PROM_CONFIG.read_text()),
                            yaml.safe_load(prom_yml.read_text()),
                            {r"\.global\.\w+_interval", r"\.rule_files\[0\]",
                             r".*\.scrape_interval", r".*\.targets\[0\]"}) == []
    assert only_differences(yaml.safe_load(AM_CONFIG.read_text()),
                            yaml.safe_load(am_yml.read_text()),
                            {r"\.route\.group_(wait|interval)", r".*\.webhook_configs\[0\]\.url"}
                            ) == []

    procs = Procs()
    procs.start([sys.executable, str(RECEIVER), "--host", "127.0.0.1", "--port",
                 str(ports["hook"])], tmp_path / "receiver.log")
    procs.start([alertmanager, f"--config.file={am_yml}", f"--storage.path={tmp_path / 'am'}",
                 f"--web.listen-address=127.0.0.1:{ports['am']}", "--cluster.listen-address="],
                tmp_path / "alertmanager.log")
    procs.start([prometheus, f"--config.file={prom_yml}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{ports['prom']}",
                 "--rules.alert.resend-delay=1s"], tmp_path / "prometheus.log")
    prom, hook = f"http://127.0.0.1:{ports['prom']}", f"http://127.0.0.1:{ports['hook']}"
    timeline: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as http:
            async def scraped() -> bool:
                res = await prom_query(http, prom, 'up{job="ha-exporter"} == 1')
                return bool(res["data"]["result"])
            await wait_for(scraped, 30, "Prometheus scraping the exporter", poll=0.2)

            masters["master-a"].kill(signal.SIGKILL)
            t0 = time.monotonic()

            async def alert_state() -> str | None:
                async with http.get(f"{prom}/api/v1/alerts") as r:
                    alerts = (await r.json())["data"]["alerts"]
                return next((a["state"] for a in alerts
                             if a["labels"]["alertname"] == "HAMasterDown"
                             and a["labels"].get("master") == "master-a"), None)
            await wait_for(alert_state, 20, "HAMasterDown pending or firing", poll=0.1)
            timeline["pending"] = time.monotonic() - t0
            await wait_for(lambda: _is(alert_state, "firing"), 20, "HAMasterDown firing", poll=0.1)
            timeline["firing"] = time.monotonic() - t0

            async def notification(status: str) -> dict | None:
                async with http.get(f"{hook}/received") as r:
                    received = await r.json()
                for item in received:
                    body = item["notification"]
                    for alert in body.get("alerts", []):
                        labels = alert["labels"]
                        if (labels.get("alertname") == "HAMasterDown"
                                and labels.get("master") == "master-a"
                                and alert["status"] == status):
                            return {"path": item["path"], **alert}
                return None
            fired = await wait_for(lambda: notification("firing"), 20, "the page", poll=0.2)
            timeline["notified"] = time.monotonic() - t0
            assert fired["path"] == "/alerts"  # the on-call receiver, not the ticket queue
            assert fired["labels"]["severity"] == "critical"
            assert fired["labels"]["job"] == "ha-exporter"
            ann = fired["annotations"]
            assert "master-a" in ann["summary"] and "master-a" in ann["description"]
            anchor = ann["runbook_url"].rsplit("#", 1)[1]
            runbook = (ROOT / "docs" / "runbook.md").read_text()
            assert re.search(rf"^#+ .*{anchor}", runbook, re.I | re.M), anchor

            masters["master-a"] = start_master(tmp_path, "master-a", ports["master-a"], "uae")
            timeline["restarted"] = time.monotonic() - t0
            await wait_for(lambda: notification("resolved"), 40, "the resolved notification",
                           poll=0.2)
            timeline["resolved"] = time.monotonic() - t0
            print("alert timeline (s after SIGKILL): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))

            # Every dashboard query runs; the core ones return data.
            for _ in range(20):
                async with http.get(f"{base}/api/v1/route"):
                    pass
            empty: list[str] = []
            for path in dashboard_paths():
                for expr in dashboard_queries(path, {"master": "master-b"}):
                    res = await prom_query(http, prom, expr)
                    assert res["status"] == "success", (path.name, expr, res)
                    if not res["data"]["result"] and metric_names(expr) & CORE_METRICS:
                        empty.append(f"{path.name}: {expr}")
            assert not empty, empty
    finally:
        procs.stop()
        exporter.stop()
        for m in masters.values():
            m.stop()


async def _is(check, expected: str) -> bool:
    return await check() == expected
