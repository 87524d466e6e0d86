"""probe -> metric -> rule -> Alertmanager -> on-call webhook, on the real binaries.

Three `ha-exporter master` processes (two active, one standby) and one `ha-exporter run`, with
failover enabled: SIGKILLing an active master must page the on-call (HAMasterDown, critical) and
record the failover to the standby (HAFailoverExecuted, info, a ticket); restarting the master
must send the resolved page. The shipped deploy/prometheus/prometheus.yml and
deploy/alertmanager/alertmanager.yml run with only addresses, paths and timings substituted
(asserted on their YAML structure), and the rules are the render of the test's exporter config,
as `ha-exporter render` makes them, so that for: durations are seconds, not minutes. Every
dashboard query then runs against the same live Prometheus.
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from exporter.config import load_config
from exporter.rules import RUNBOOK_URL, render
from tests.monitoring import (
    ALERTMANAGER_YML,
    PROMETHEUS_YML,
    Monitoring,
    fast_alertmanager,
    fast_prometheus,
    running,
    yaml_changes,
)
from tests.processes import Stack, StartStack
from tests.support import get_json, wait_for
from tests.tools import ROOT, dashboard_paths, dashboard_queries, panels, require_binary, substitute

#: (name, region, role, priority): a standby in the victim's region to fail over to.
SPECS = [
    ("master-a", "uae", "active", 1),
    ("master-b", "usa", "active", 2),
    ("master-c", "uae", "standby", 3),
]
VICTIM = "master-a"
SURVIVOR = "master-b"
#: Long cooldown: exactly one failover; checkpoints every second so it moves real state.
FAILOVER = {"enabled": True, "cooldown": "60s", "checkpoint_interval": "1s"}
#: tests.support.FAST_PROBE probes every 500ms and fails a master after 3 failures, so the
#: rendered HAMasterDown waits ceil(0.5 s x 3) = 2s instead of the shipped 15s.
EXPECTED_DOWN_FOR = "2s"

#: Panels that must return data with the master variable set to a survivor (master-b), on a
#: fleet that has run ~15 s, lost a master, failed it over and routed traffic: each is backed by
#: a gauge or counter the exporter exposes from the first scrape, by a recording rule, or by an
#: event this test causes (route decisions, one failover, a firing HAFailoverExecuted). Left out,
#: and only required to run without error: "Rebalances by reason" (a rebalance needs an imbalance
#: that lasts balancing.rebalance.for, 30s) and the failover annotation (empty: the exporter's
#: ha_failovers_total{master,result} series is born at 1, so increase() never sees the first
#: failover of a master; reported with a patch).
CORE_PANELS: dict[str, set[str]] = {
    "ha-exporter-fleet.json": {
        "Fleet health score", "Masters serving", "Masters failed", "Failovers in progress",
        "Firing HA alerts", "Exporter", "Masters by state", "Last probe result by master",
        "Failover duration", "Firing alerts",
    },
    "ha-exporter-master.json": {
        "State", "Last probe", "Consecutive failures", "Routing weight", "Last probe age",
        "Recovery", "Probe latency", "Probe results", "Queue", "CPU and memory",
        "Routing decisions", "State over time", "Probe error ratio (SLI)",
    },
    "ha-exporter-balancing.json": {
        "Load distribution quality", "Routing decisions", "Masters in rotation", "Rebalances",
        "Routing weight by master", "Share of routing decisions", "Routing decisions by master",
        "Routing decisions by strategy", "Queue per unit of weight",
    },
    "ha-exporter-slo.json": {
        "Availability objective", "Availability, last 1d", "Availability, last 3d",
        "Error budget remaining (30d)", "Availability (5m)", "Burn rate, paging windows",
        "Burn rate, ticket windows", "Failed probes by result", "Error budget remaining over time",
    },
}
#: With the master variable on the victim: the panels that show its outage and failover. (Its
#: routing panels may be empty: it is a fenced standby with weight 0 after the restart.)
VICTIM_PANELS: dict[str, set[str]] = {
    "ha-exporter-fleet.json": {"Failovers by result"},
    "ha-exporter-master.json": {
        "State", "Consecutive failures", "Probe results", "Probe error ratio (SLI)",
        "Failovers away from this master", "State over time",
    },
    "ha-exporter-slo.json": {"Failed probes by result", "Burn rate, paging windows"},
}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (lowercase, dashes)."""
    return {
        re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#{1,6}\s+(.+)$", markdown, re.M)
    }


def titled_queries(path: Path, values: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of a dashboard, in dashboard_queries' order."""
    titled = [(p.get("title", ""), substitute(t["expr"], values))
              for p in panels(path) for t in p.get("targets", []) if t.get("expr")]
    exprs = dashboard_queries(path, values)
    titled += [("(annotation)", e) for e in exprs[len(titled):]]
    assert [e for _, e in titled] == exprs
    return titled


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample, and not only NaN (histogram_quantile over no observations)."""
    return any(not math.isnan(float(s["value"][1])) for s in result)


def find_alert(alerts: list[dict[str, Any]], name: str, master: str) -> dict[str, Any] | None:
    return next((a for a in alerts if a["labels"].get("alertname") == name
                 and a["labels"].get("master") == master), None)


def received(notes: list[dict[str, Any]], name: str, master: str,
             status: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The first (notification, alert) delivered for alertname+master with that status."""
    for note in notes:
        for alert in note["notification"].get("alerts", []):
            labels = alert["labels"]
            if (labels.get("alertname") == name and labels.get("master") == master
                    and alert["status"] == status):
                return note, alert
    return None


async def route_some(http: aiohttp.ClientSession, base: str, n: int = 20) -> None:
    """Routing decisions, so that the balancing panels have counters to rate."""
    for i in range(n):
        async with http.get(f"{base}/api/v1/route", params={"key": f"k{i}"}) as r:
            assert r.status == 200, await r.text()


async def test_sigkilled_master_pages_the_oncall_and_resolves(
    tmp_path: Path, stack: StartStack
) -> None:
    prometheus = require_binary("prometheus")
    alertmanager = require_binary("prometheus-alertmanager", "alertmanager")
    fleet = await stack(SPECS, failover=FAILOVER)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        await _run(http, tmp_path, fleet, prometheus, alertmanager)


async def _run(http: aiohttp.ClientSession, tmp: Path, stack: Stack, prometheus: str,
               alertmanager: str) -> None:
    rules_dir = tmp / "rules"
    render(load_config(stack.config), rules_dir)
    rules = yaml.safe_load((rules_dir / "alerts.yml").read_text())
    down_rule = next(r for g in rules["groups"] for r in g["rules"]
                     if r.get("alert") == "HAMasterDown")
    assert down_rule["for"] == EXPECTED_DOWN_FOR

    # every process's log (masters, exporter, receiver, Alertmanager, Prometheus) is in tmp:
    # a failure prints their tails (tests/conftest.py)
    async with running(http, tmp, prometheus, alertmanager,
                       fast_prometheus(stack.base, rules_dir), fast_alertmanager) as mon:
        await _scenario(http, stack, mon, stack.base.removeprefix("http://"), rules_dir,
                        mon.addresses)


async def _scenario(http: aiohttp.ClientSession, stack: Stack, mon: Monitoring, exporter: str,
                    rules_dir: Path, addr: dict[str, str]) -> None:
    # 1. The configs are the shipped ones, but for the substituted leaves.
    assert yaml_changes(yaml.safe_load(PROMETHEUS_YML.read_text()),
                        yaml.safe_load(mon.prometheus_yml.read_text())) == {
        ".global.scrape_interval": ("15s", "1s"),
        ".global.evaluation_interval": ("15s", "1s"),
        ".rule_files[0]": ("../../alert_rules/*.yml", f"{rules_dir}/*.yml"),
        ".alerting.alertmanagers[0].static_configs[0].targets[0]":
            ("127.0.0.1:9093", addr["alertmanager"]),
        ".scrape_configs[0].scrape_interval": ("5s", "1s"),
        ".scrape_configs[0].static_configs[0].targets[0]": ("127.0.0.1:9108", exporter),
        ".scrape_configs[1].static_configs[0].targets[0]": ("127.0.0.1:9090", addr["prometheus"]),
        ".scrape_configs[2].static_configs[0].targets[0]":
            ("127.0.0.1:9093", addr["alertmanager"]),
    }
    hook = f"http://{addr['receiver']}"
    assert yaml_changes(yaml.safe_load(ALERTMANAGER_YML.read_text()),
                        yaml.safe_load(mon.alertmanager_yml.read_text())) == {
        ".route.group_wait": ("5s", "1s"),
        ".route.group_interval": ("30s", "1s"),
        ".route.routes[2].group_wait": ("30s", "1s"),
        ".receivers[0].webhook_configs[0].url": ("http://127.0.0.1:9099/alerts", f"{hook}/alerts"),
        ".receivers[1].webhook_configs[0].url":
            ("http://127.0.0.1:9099/tickets", f"{hook}/tickets"),
    }

    # 2. Scraped, rules loaded, Alertmanager discovered, the victim seen healthy.
    await stack.ready(http)

    async def ready_to_alert() -> bool:
        async with http.get(f"{mon.prometheus}/api/v1/alertmanagers") as r:
            active = (await r.json())["data"]["activeAlertmanagers"]
        return (any(addr["alertmanager"] in a["url"] for a in active)
                and bool(await mon.query('up{job="ha-exporter"} == 1'))
                and bool(await mon.query(
                    f'ha_master_state{{master="{VICTIM}", state="healthy"}} == 1')))
    await wait_for(ready_to_alert, 30, "Prometheus scraping the exporter, Alertmanager known",
                   poll=0.2)
    await route_some(http, stack.base)

    stack.masters[VICTIM].kill(signal.SIGKILL)
    t0 = time.monotonic()
    timeline: dict[str, float] = {}
    states: list[str] = []

    async def down_alert(state: str) -> dict[str, Any] | None:
        alert = find_alert(await mon.alerts(), "HAMasterDown", VICTIM)
        if alert is not None and (not states or states[-1] != alert["state"]):
            states.append(alert["state"])
        return alert if alert is not None and alert["state"] == state else None

    await wait_for(lambda: down_alert("pending"), 20, "HAMasterDown pending", poll=0.05)
    timeline["pending"] = time.monotonic() - t0
    firing = await wait_for(lambda: down_alert("firing"), 15, "HAMasterDown firing", poll=0.05)
    timeline["firing"] = time.monotonic() - t0
    assert states == ["pending", "firing"]
    expected_labels = {"alertname": "HAMasterDown", "master": VICTIM, "severity": "critical",
                       "job": "ha-exporter", "instance": exporter}
    assert firing["labels"] == expected_labels
    # no other master is reported down
    assert [a["labels"]["master"] for a in await mon.alerts()
            if a["labels"]["alertname"] == "HAMasterDown"] == [VICTIM]

    # 3. The page reaches the on-call receiver, through the critical route.
    page_note, page = await wait_for(
        lambda: _received(mon, "HAMasterDown", "firing"), 15, "the page at the receiver", poll=0.1)
    timeline["notified"] = time.monotonic() - t0
    assert page_note["path"] == "/alerts"
    assert page_note["notification"]["receiver"] == "oncall-webhook"
    assert page_note["notification"]["groupLabels"] == {"alertname": "HAMasterDown",
                                                        "master": VICTIM}
    assert page["labels"] == expected_labels
    ann = page["annotations"]
    assert ann == firing["annotations"]  # Alertmanager passed on what Prometheus rendered
    assert ann["summary"] == f"Master {VICTIM} is down."
    assert VICTIM in ann["description"] and exporter in ann["description"]
    assert f"at least {EXPECTED_DOWN_FOR}" in ann["description"]
    url, _, anchor = ann["runbook_url"].partition("#")
    assert url == RUNBOOK_URL and url.endswith("/docs/runbook.md")
    assert anchor == "hamasterdown"
    assert anchor in github_anchors((ROOT / "docs" / "runbook.md").read_text())

    # 4. The failover to the standby is recorded: info alert, routed to the ticket receiver.
    fo = await wait_for(lambda: _firing(mon, "HAFailoverExecuted"), 15,
                        "HAFailoverExecuted firing", poll=0.1)
    assert fo["labels"]["severity"] == "info" and fo["labels"]["result"] == "success"
    history = (await get_json(http, f"{stack.base}/api/v1/failovers"))["items"]
    assert (history[0]["master"], history[0]["result"], history[0]["backup"]) == (
        VICTIM, "success", "master-c")
    ticket_note, _ = await wait_for(
        lambda: _received(mon, "HAFailoverExecuted", "firing"), 15,
        "the failover ticket at the receiver", poll=0.1)
    timeline["failover ticket"] = time.monotonic() - t0
    assert ticket_note["path"] == "/tickets"
    assert ticket_note["notification"]["receiver"] == "ticket-webhook"
    assert ticket_note["notification"]["groupLabels"] == {"alertname": "HAFailoverExecuted",
                                                          "master": VICTIM}

    # 5. Restart on the same port (the URL in the exporter's config): the page resolves.
    await stack.restart_master(VICTIM)
    timeline["restarted"] = time.monotonic() - t0
    resolved_note, resolved = await wait_for(
        lambda: _received(mon, "HAMasterDown", "resolved"), 30,
        "the resolved notification", poll=0.1)
    timeline["resolved"] = time.monotonic() - t0
    assert resolved_note["path"] == "/alerts"
    assert resolved["labels"] == expected_labels
    assert resolved["startsAt"] == page["startsAt"]  # the same alert, now ended
    assert not resolved["endsAt"].startswith("0001-")
    # The on-call was paged for the victim only, and for nothing else.
    pages = {(a["labels"]["alertname"], a["labels"].get("master"))
             for n in await mon.notifications() if n["path"] == "/alerts"
             for a in n["notification"]["alerts"]}
    assert pages == {("HAMasterDown", VICTIM)}
    print("\nalert timeline (s after SIGKILL): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))

    # 6. Every dashboard query runs on the live data, for every master; the core panels return
    # data. A second batch of routing makes the decision counters rise between two scrapes.
    await route_some(http, stack.base)

    async def routed_scraped() -> bool:
        total = await mon.query("sum(ha_route_decisions_total)")
        return bool(total) and float(total[0]["value"][1]) >= 40
    await wait_for(routed_scraped, 10, "the second batch of routing decisions scraped", poll=0.2)
    for required in (CORE_PANELS, VICTIM_PANELS):  # a renamed panel must not pass unchecked
        for name, titles in required.items():
            assert titles <= {p.get("title") for p in panels(ROOT / "dashboards" / name)}, name
    missing: list[str] = []
    for master in [n for n, *_ in SPECS]:
        empty: list[str] = []
        for path in dashboard_paths():
            required = (CORE_PANELS if master == SURVIVOR else VICTIM_PANELS if master == VICTIM
                        else {}).get(path.name, set())
            for title, expr in titled_queries(path, {"master": master}):
                if has_data(await mon.query(expr)):
                    continue
                empty.append(f"{path.stem} [{title}]")
                if title in required:
                    missing.append(f"master={master} {path.name} [{title}]: {expr}")
        print(f"dashboard queries without data for master={master}: "
              + ", ".join(sorted(set(empty))))
    assert not missing, "\n".join(missing)
    # The victim's outage is in its panels as what it was: refused connections.
    results = await mon.query(dashboard_query("ha-exporter-master.json", "Probe results", VICTIM))
    assert any(r["metric"]["result"] == "connect_error" and float(r["value"][1]) > 0
               for r in results), results


def dashboard_query(dashboard: str, title: str, master: str) -> str:
    """The (first) expr of one panel, variables substituted."""
    return next(e for t, e in titled_queries(ROOT / "dashboards" / dashboard, {"master": master})
                if t == title)


async def _received(mon: Monitoring, name: str,
                    status: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    return received(await mon.notifications(), name, VICTIM, status)


async def _firing(mon: Monitoring, name: str) -> dict[str, Any] | None:
    alert = find_alert(await mon.alerts(), name, VICTIM)
    return alert if alert is not None and alert["state"] == "firing" else None
