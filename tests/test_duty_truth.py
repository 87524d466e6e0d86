"""Duties as the masters themselves report them, end to end on the real binaries.

Three `ha-exporter master` processes (master-a and master-b active, master-c standby) and one
`ha-exporter run` with failover disabled, so that nothing repairs what the test breaks behind the
exporter's back; a real Prometheus scrapes it with the rules rendered from the test's config,
and Alertmanager passes pages to the on-call webhook receiver (tests.monitoring, with the same
substitutions as tests/test_alerting_e2e.py).

1. Every duty served: ha_duty_served is 1 for each, one holder each.
2. master-a is deactivated straight on the master (`POST /deactivate`): its duty goes unserved
   while the exporter still believes master-a holds it; HADutyUnserved fires and pages.
3. master-c is activated for master-b's duty as well: two holders, HADutyMultipleHolders fires.
4. The dashboards' duty panels show it on the live data; undoing both resolves both alerts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from exporter.config import load_config
from exporter.rules import RUNBOOK_URL, render
from tests.monitoring import Monitoring, fast_alertmanager, fast_prometheus, running
from tests.processes import Stack, StartStack
from tests.support import get_json, wait_for
from tests.tools import ROOT, require_binary, substitute
from tests.tools import panels as dashboard_panels

SPECS = [
    ("master-a", "uae", "active", 1),
    ("master-b", "usa", "active", 2),
    ("master-c", "uae", "standby", 3),
]
#: Nothing may repair the fleet behind the test: the exporter only watches.
FAILOVER = {"enabled": False}
#: Without automatic failover the duty alerts wait detection (3 x 500ms) plus one interval.
EXPECTED_FOR = "2s"
FLEET_DASHBOARD = ROOT / "dashboards" / "ha-exporter-fleet.json"
#: The fleet dashboard's duty panels, each with the value it must show in step 4 (master-a's duty
#: unserved, master-b's split; per duty for the two per-duty panels).
DUTY_PANELS: dict[str, float | dict[str, float]] = {
    "Duties served": 0,
    "Duties unserved": 1,
    "Duties split": 1,
    "State store errors": 0,
    "Duties": {"master-a": 0, "master-b": 2},
    "Holders per duty": {"master-a": 0, "master-b": 2},
}


async def test_unserved_and_split_duties_are_seen_and_page(
    tmp_path: Path, stack: StartStack
) -> None:
    prometheus = require_binary("prometheus")
    alertmanager = require_binary("prometheus-alertmanager", "alertmanager")
    fleet = await stack(SPECS, failover=FAILOVER)
    rules_dir = tmp_path / "rules"
    render(load_config(fleet.config), rules_dir)
    rules = yaml.safe_load((rules_dir / "alerts.yml").read_text())
    holds = {r["alert"]: r["for"] for g in rules["groups"] for r in g["rules"]
             if r.get("alert", "").startswith("HADuty")}
    assert holds == {"HADutyUnserved": EXPECTED_FOR, "HADutyMultipleHolders": EXPECTED_FOR}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with running(http, tmp_path, prometheus, alertmanager,
                           fast_prometheus(fleet.base, rules_dir), fast_alertmanager) as mon:
            await _scenario(http, fleet, mon)


async def _values(mon: Monitoring, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in await mon.query(expr)}


async def _firing(mon: Monitoring, name: str, duty: str) -> dict[str, Any] | None:
    return next((a for a in await mon.alerts() if a["labels"].get("alertname") == name
                 and a["labels"].get("duty") == duty and a["state"] == "firing"), None)


async def _received(mon: Monitoring, name: str, duty: str,
                    status: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    for note in await mon.notifications():
        for alert in note["notification"].get("alerts", []):
            labels = alert["labels"]
            if (labels.get("alertname"), labels.get("duty"), alert["status"]) == (
                    name, duty, status):
                return note, alert
    return None


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A control call straight to a master, bypassing the exporter."""
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _scenario(http: aiohttp.ClientSession, stack: Stack, mon: Monitoring) -> None:
    job = 'job="ha-exporter"'
    timeline: dict[str, float] = {}

    # 1. Scraped, rules loaded, Alertmanager known, every duty served by its own master.
    await stack.ready(http)

    async def all_served() -> bool:
        async with http.get(f"{mon.prometheus}/api/v1/alertmanagers") as r:
            active = (await r.json())["data"]["activeAlertmanagers"]
        return (any(mon.addresses["alertmanager"] in a["url"] for a in active)
                and await _values(mon, f"ha_duty_served{{{job}}}", "duty")
                == {"master-a": 1, "master-b": 1})
    await wait_for(all_served, 30, "both duties served, as Prometheus sees it", poll=0.2)
    assert await _values(mon, f"ha_duty_holders{{{job}}}", "duty") == {
        "master-a": 1, "master-b": 1}
    holders = {(r["metric"]["duty"], r["metric"]["master"])
               for r in await mon.query(f"ha_duty_holder{{{job}}}")}
    assert holders == {("master-a", "master-a"), ("master-b", "master-b")}
    assert await _values(mon, f"ha_fleet_health_score{{{job}}}", "job") == {"ha-exporter": 100}

    # 2. master-a stops serving, told so directly: the exporter's belief does not change.
    assert await _post(http, f"{stack.urls['master-a']}/deactivate", {}) == {
        "active": False, "duties": []}
    t0 = time.monotonic()

    async def unserved_scraped() -> bool:
        return (await _values(mon, f'ha_duty_served{{{job}, duty="master-a"}}', "duty")
                == {"master-a": 0})
    await wait_for(unserved_scraped, 15, "ha_duty_served{duty=master-a} 0 in Prometheus",
                   poll=0.05)
    timeline["ha_duty_served 0"] = time.monotonic() - t0
    entry = await get_json(http, f"{stack.base}/api/v1/masters/master-a")
    assert (entry["duties"], entry["role"]) == (["master-a"], "active")  # the belief
    assert (entry["reported_active"], entry["reported_duties"]) == (False, [])  # the truth
    async with http.get(f"{stack.base}/") as r:
        page = await r.text()
    assert 'data-duty="master-a" data-state="unserved"' in page and "UNSERVED" in page
    assert "duties: 1/2 served" in page

    unserved = await wait_for(lambda: _firing(mon, "HADutyUnserved", "master-a"), 20,
                              "HADutyUnserved firing", poll=0.05)
    timeline["HADutyUnserved firing"] = time.monotonic() - t0
    assert unserved["labels"] == {"alertname": "HADutyUnserved", "duty": "master-a",
                                  "severity": "critical", "job": "ha-exporter"}
    assert unserved["annotations"]["summary"] == "Duty master-a is not served by any master."
    assert unserved["annotations"]["runbook_url"] == f"{RUNBOOK_URL}#hadutyunserved"
    note, paged = await wait_for(
        lambda: _received(mon, "HADutyUnserved", "master-a", "firing"), 15,
        "the HADutyUnserved page at the receiver", poll=0.1)
    timeline["HADutyUnserved paged"] = time.monotonic() - t0
    assert note["path"] == "/alerts" and note["notification"]["receiver"] == "oncall-webhook"
    assert paged["labels"] == unserved["labels"]
    assert await _values(mon, f"ha_fleet_health_score{{{job}}}", "job") == {"ha-exporter": 50}

    # 3. master-c takes master-b's duty as well, while master-b still serves it: split brain.
    assert await _post(http, f"{stack.urls['master-c']}/activate",
                       {"taken_over": "master-b"}) == {"active": True, "duties": ["master-b"]}
    t1 = time.monotonic()

    async def split_scraped() -> bool:
        return (await _values(mon, f'ha_duty_holders{{{job}, duty="master-b"}}', "duty")
                == {"master-b": 2})
    await wait_for(split_scraped, 15, "ha_duty_holders{duty=master-b} 2 in Prometheus", poll=0.05)
    timeline["ha_duty_holders 2"] = time.monotonic() - t1
    split = await wait_for(lambda: _firing(mon, "HADutyMultipleHolders", "master-b"), 20,
                           "HADutyMultipleHolders firing", poll=0.05)
    timeline["HADutyMultipleHolders firing"] = time.monotonic() - t1
    assert split["labels"] == {"alertname": "HADutyMultipleHolders", "duty": "master-b",
                               "severity": "critical", "job": "ha-exporter"}
    assert split["annotations"]["summary"] == "Duty master-b is served by 2 masters at once."
    assert float(split["value"]) == 2
    # a split duty is served twice, not unserved: only master-a's duty is
    assert [a["labels"]["duty"] for a in await mon.alerts()
            if a["labels"]["alertname"] == "HADutyUnserved"] == ["master-a"]
    await wait_for(lambda: _received(mon, "HADutyMultipleHolders", "master-b", "firing"), 15,
                   "the HADutyMultipleHolders page at the receiver", poll=0.1)
    assert await _values(mon, f"ha_fleet_health_score{{{job}}}", "job") == {"ha-exporter": 0}

    # 4. The fleet dashboard's duty panels, on the same live data.
    await _check_panels(mon)

    # 5. Undone, straight on the masters again: both alerts resolve, the page says so.
    await _post(http, f"{stack.urls['master-a']}/activate", {})
    await _post(http, f"{stack.urls['master-c']}/deactivate", {"taken_over": "master-b"})
    t2 = time.monotonic()

    async def resolved() -> bool:
        return (not [a for a in await mon.alerts() if a["labels"]["alertname"].startswith(
            "HADuty")] and bool(await _received(mon, "HADutyUnserved", "master-a", "resolved")))
    await wait_for(resolved, 20, "both duty alerts resolved", poll=0.1)
    timeline["resolved"] = time.monotonic() - t2
    assert await _values(mon, f"ha_duty_served{{{job}}}", "duty") == {
        "master-a": 1, "master-b": 1}
    print("\nduty timeline (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))


async def _check_panels(mon: Monitoring) -> None:
    titled = [(p["title"], substitute(t["expr"])) for p in dashboard_panels(FLEET_DASHBOARD)
              for t in p.get("targets", []) if t.get("expr")]
    assert set(DUTY_PANELS) <= {title for title, _ in titled}
    for title, expr in titled:
        result = await mon.query(expr)  # every query runs; a PromQL error fails here
        if title not in DUTY_PANELS:
            continue
        want = DUTY_PANELS[title]
        got = {r["metric"].get("duty", ""): float(r["value"][1]) for r in result}
        assert len(got) == len(result), f"panel {title!r}: {result}"
        expected = want if isinstance(want, dict) else {"": want}  # a stat: one unlabelled value
        assert got == expected, f"panel {title!r}: {expr} gave {got}"
    ops = await mon.query('sum by (op) (increase(ha_state_store_errors_total{job="ha-exporter"}'
                          '[1m]))')
    assert all(float(r["value"][1]) == 0 for r in ops), ops  # a healthy store: no errors
