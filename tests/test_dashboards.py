"""Grafana dashboards: structure that makes them portable and honest.

Every panel must be selectable by datasource, carry a unit and a description, use
$__rate_interval in rate()/increase() (so that it never shows gaps at any zoom), and only query
metrics the exporter exposes or the rules record. Running every query against a real Prometheus
scraping a single node is the end-to-end test's job (tests/test_alerting_e2e.py; the Cluster
row's queries run there too, and return nothing); here every query also runs against a real
Prometheus scraping a cluster of three replicas on etcd, where each master's series come from two
replicas: the panels must count every master once, and the Cluster row must show the cluster.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter.config import load_config
from exporter.rules import render
from tests.cluster.etcd_server import EtcdServer, etcd_server  # noqa: F401  (fixture)
from tests.cluster.harness import ClusterStack
from tests.monitoring import _start_on_picked_port, _wait_up, substitute_text
from tests.processes import Proc
from tests.support import closed_port, wait_for, wait_ready
from tests.tools import (
    ROOT,
    dashboard_paths,
    dashboard_queries,
    metric_names,
    panels,
    require_binary,
    substitute,
    unknown_metrics,
)

EXPECTED_UIDS = {
    "ha-exporter-fleet", "ha-exporter-master", "ha-exporter-balancing", "ha-exporter-slo",
}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
#: Exposed beyond tests.tools' lists: the duty families and the counters read from the store
#: and the checkpointer.
RANGE_FUNCTIONS = ("rate", "irate", "increase", "delta", "idelta", "deriv")
PATHS = dashboard_paths()
#: The cluster families (exporter.metrics.cluster): exposed by replicas in cluster mode only.


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_expected_dashboards_exist_with_stable_uids() -> None:
    uids = [_load(p)["uid"] for p in PATHS]
    assert sorted(uids) == sorted(EXPECTED_UIDS)
    for path in PATHS:
        assert _load(path)["uid"] == path.stem, "file named after its uid, so links stay stable"
    titles = [_load(p)["title"] for p in PATHS]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_dashboard_metadata(path: Path) -> None:
    board = _load(path)
    assert board["schemaVersion"] >= 39
    assert board.get("id") is None, "no instance-specific id in a provisioned dashboard"
    assert "ha-exporter" in board["tags"]
    assert board["description"]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_variables_datasource_job_master(path: Path) -> None:
    variables = {v["name"]: v for v in _load(path)["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "master"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE_REF
        assert var["definition"].startswith("label_values(") and var["definition"].endswith(
            f", {name})")
    assert '$job' in variables["master"]["definition"], "master list follows the job"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_every_panel_has_unit_description_and_the_datasource_variable(path: Path) -> None:
    ids = set()
    for panel in panels(path):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["id"] not in ids, f"{title}: duplicate panel id"
        ids.add(panel["id"])
        assert panel.get("description", "").strip(), f"{title}: description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: unit"
        assert panel["datasource"] == DATASOURCE_REF, f"{title}: datasource variable"
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, f"{title}: target datasource"
            assert target["expr"].strip(), f"{title}: empty expr"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_panels_fit_the_grid_without_overlap(path: Path) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(path):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_every_range_function_uses_rate_interval(path: Path) -> None:
    pattern = re.compile(rf"\b({'|'.join(RANGE_FUNCTIONS)})\s*\(([^()]*?)\[([^\]]+)\]")
    for expr in dashboard_queries(path, raw=True):
        calls = re.findall(rf"\b({'|'.join(RANGE_FUNCTIONS)})\s*\(", expr)
        ranges = pattern.findall(expr)
        assert len(ranges) == len(calls), f"cannot find the range of every call in {expr}"
        for func, _, window in ranges:
            assert window == "$__rate_interval", f"{func}(...[{window}]) in {expr}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_queries_filter_by_the_job_and_master_variables(path: Path) -> None:
    for expr in dashboard_queries(path, raw=True):
        for selector in re.finditer(r"\b((?:ha_|master:)[\w:]*)\{([^}]*)\}", expr):
            name, matchers = selector.groups()
            assert 'job=~"$job"' in matchers, f"{name} without the job filter in {expr}"
            if name.startswith(("ha_master_", "master:")):
                assert 'master=~"$master"' in matchers, f"{name} without $master in {expr}"
        for name in metric_names(expr):
            if name.startswith(("ha_", "master:")):
                assert f"{name}{{" in expr, f"unfiltered selector {name} in {expr}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_queries_use_only_exposed_metrics_and_recording_rules(path: Path) -> None:
    names: set[str] = set()
    for expr in dashboard_queries(path):
        names |= metric_names(expr)
    assert names, "no metric found: the extraction is broken"
    unknown = unknown_metrics(names)
    assert not unknown, f"unknown metrics: {sorted(unknown)}"


def test_dashboard_queries_substitute_every_variable() -> None:
    for path in PATHS:
        for expr in dashboard_queries(path, {"master": "master-a"}):
            assert "$" not in expr, expr
    assert substitute('x{job=~"$job"}[$__rate_interval]') == 'x{job=~"ha-exporter"}[1m]'
    assert substitute('x{m=~"${master:regex}"}', {"master": "a|b"}) == 'x{m=~"a|b"}'
    with pytest.raises(KeyError):
        substitute("x[$unknown]")


def test_provisioning_points_at_the_dashboards_and_the_datasource_uid() -> None:
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/ha-exporter.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True


# --- every query on a live cluster -----------------------------------------------------------

#: Four masters, two of them active (two duties), on three replicas with two observers each.
CLUSTER_SPECS = [("master-a", "uae", "active", 1), ("master-b", "usa", "active", 2),
                 ("master-c", "uae", "standby", 3), ("master-d", "usa", "standby", 4)]
MASTERS = [name for name, *_ in CLUSTER_SPECS]
REPLICAS = ["exporter-1", "exporter-2", "exporter-3"]
OBSERVERS = 2  # ClusterStack's default
CLUSTER_PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus-cluster.yml"
FLEET = ROOT / "dashboards" / "ha-exporter-fleet.json"
CLUSTER_ROW = {
    "Cluster members", "Leaders", "Leader epoch", "Failed observer verdicts", "Leader by replica",
    "Masters probed by replica", "Members and epoch", "Observer verdicts",
    "Observers that see each master failed",
}
#: Queries drawn one series per master (legend "{{master}}..."), that must have data on a
#: healthy cluster: each master must appear once, never once per replica. (The others of that
#: kind, on routing decisions, have no traffic here; they still run.)
PER_MASTER = {
    ("ha-exporter-fleet", "Last probe result by master"),
    ("ha-exporter-balancing", "Routing weight by master"),
    ("ha-exporter-slo", "Availability (5m)"),
    ("ha-exporter-slo", "Availability, last 1d"),
    ("ha-exporter-slo", "Availability, last 3d"),
    ("ha-exporter-slo", "Burn rate, paging windows"),
    ("ha-exporter-slo", "Burn rate, ticket windows"),
    ("ha-exporter-slo", "Error budget remaining (30d)"),
    ("ha-exporter-slo", "Error budget remaining over time"),
}
#: Alerts that a healthy cluster must not even have pending: the ones that miscounted (or would
#: miscount) masters seen from several replicas, and the cluster's own.
QUIET = {
    "HAMasterDown", "HAMasterDegraded", "HANoHealthyBackup", "HANoMasterAvailable",
    "HAClusterNoLeader", "HAClusterMemberDown", "HAMasterObserversDisagree",
}


class LivePrometheus:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/api/v1/query", params={"query": expr}) as r:
            body = await r.json()
        assert body.get("status") == "success", f"{expr!r}: {body}"
        return list(body["data"]["result"])

    async def get(self, path: str) -> Any:
        async with self.http.get(f"{self.base}{path}") as r:
            return (await r.json())["data"]


def _targets(path: Path, values: dict[str, str]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every panel target, variables substituted."""
    return [(p["title"], t["refId"], substitute(t["expr"], values))
            for p in panels(path) for t in p.get("targets", []) if t.get("expr")]


def _per_master_targets() -> set[tuple[str, str, str]]:
    """(dashboard, panel title, refId) of every target drawn one series per master."""
    return {(path.stem, p["title"], t["refId"]) for path in PATHS for p in panels(path)
            for t in p.get("targets", []) if t.get("legendFormat", "").startswith("{{master}}")}


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result]


@pytest.fixture
async def live_cluster(tmp_path: Path, etcd_server: EtcdServer,  # noqa: F811
                       ) -> AsyncIterator[tuple[ClusterStack, LivePrometheus]]:
    """Three replicas on a real etcd, scraped every second by a real Prometheus running
    deploy/compose/prometheus-cluster.yml (addresses, paths and timings substituted) with the
    rules rendered from the replicas' config."""
    binary = require_binary("prometheus")
    stack = ClusterStack(tmp_path, etcd_server, CLUSTER_SPECS)
    procs: list[Proc] = []
    try:
        await stack.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for base in stack.bases.values():
                await wait_ready(http, base, timeout=30)
            await stack.settled_leader(http)
            rules = tmp_path / "rules"
            render(load_config(stack.configs["exporter-1"]), rules)
            prom_yml = tmp_path / "prometheus.yml"
            targets = {f"{m}:9108": stack.bases[m].removeprefix("http://") for m in REPLICAS}

            def start(port: int) -> Proc:
                address = f"127.0.0.1:{port}"
                prom_yml.write_text(substitute_text(CLUSTER_PROMETHEUS.read_text(), {
                    "scrape_interval: 15s": "scrape_interval: 1s",
                    "evaluation_interval: 15s": "evaluation_interval: 1s",
                    "scrape_interval: 5s": "scrape_interval: 1s",
                    "../../alert_rules/*.yml": f"{rules}/*.yml",
                    "alertmanager:9093": f"127.0.0.1:{closed_port()}",
                    "prometheus:9090": address,
                    **targets,
                }))
                proc = Proc([binary, f"--config.file={prom_yml}",
                             f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                             f"--web.listen-address={address}"], tmp_path / "prometheus.log")
                procs.append(proc)
                return proc

            prometheus, address = await _start_on_picked_port(start, "prometheus")
            await _wait_up(http, prometheus, f"http://{address}/-/ready")
            yield stack, LivePrometheus(http, f"http://{address}")
    finally:
        for proc in procs:
            proc.stop()
        stack.stop()


async def _settled(prom: LivePrometheus, replicas: int) -> None:
    """Every replica scraped, the shards settled (each master on min(observers, replicas)),
    and a few scrapes in, so that rate() and the recording rules have two samples."""
    per_master = min(OBSERVERS, replicas)

    async def ready() -> bool | tuple[str, ...]:
        up = _values(await prom.query('up{job="ha-exporter"} == 1'))
        probed = _values(await prom.query('ha_cluster_probed_masters{job="ha-exporter"}'))
        # a dead replica's rate-based series linger for the rate's window: live ones only
        ratios = await prom.query('master:ha_probe_errors:ratio_rate5m{job="ha-exporter"}'
                                  ' and on (instance) up{job="ha-exporter"} == 1')
        verdicts = await prom.query('ha_master_observer_failed{job="ha-exporter"}')
        if (len(up) == replicas and sum(probed) == len(MASTERS) * per_master
                and len(ratios) == len(MASTERS) * per_master
                and len(verdicts) == len(MASTERS) * per_master):
            return True
        global _last_unsettled  # what the wait reports if it times out
        _last_unsettled = (f"up {len(up)}", f"probed {probed}",
                           f"ratios {sorted(_series(r) for r in ratios)}",
                           f"verdicts {sorted(_series(v) for v in verdicts)}")
        return False

    try:
        await wait_for(ready, 60, f"{replicas} replicas scraped with their shards settled",
                       poll=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {_last_unsettled}") from None


_last_unsettled: tuple[str, ...] = ()


def _series(sample: dict[str, Any]) -> str:
    labels = sample["metric"]
    return f"{labels.get('instance', '')}/{labels.get('master', '')}"


async def _check_every_query(prom: LivePrometheus, members: int) -> None:
    """Every query of every dashboard runs; the counts are those of the fleet, not of the
    replicas; the Cluster row shows the cluster (``members`` live of the REPLICAS scraped)."""
    per_master = min(OBSERVERS, members)
    got: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for path in PATHS:
        for master in (".+", *MASTERS):
            for title, ref, expr in _targets(path, {"master": master}):
                result = await prom.query(expr)  # a PromQL error fails here, with its message
                if master == ".+":
                    got[(path.stem, title, ref)] = result
        for expr in dashboard_queries(path)[len(_targets(path, {})):]:  # the annotations
            await prom.query(expr)

    def one(board: str, title: str, ref: str = "A") -> float:
        (value,) = _values(got[(board, title, ref)])
        return value

    fleet = "ha-exporter-fleet"
    assert {t for b, t, _ in got if b == fleet} >= CLUSTER_ROW, "a Cluster panel was renamed"
    empty = sorted(title for (board, title, _), r in got.items()
                   if board == fleet and title in CLUSTER_ROW
                   and not any(not math.isnan(v) for v in _values(r)))
    assert not empty, f"Cluster row panels without data: {empty}"
    assert one(fleet, "Masters serving") == len(MASTERS)  # not len(MASTERS) x observers
    assert one(fleet, "Masters failed") == 0
    by_state = {s["metric"]["state"]: float(s["value"][1])
                for s in got[(fleet, "Masters by state", "A")]}
    assert by_state == {"healthy": len(MASTERS)}
    assert one(fleet, "Duties served") == 2 and one(fleet, "Duties unserved") == 0
    assert one(fleet, "Fleet health score") == 100
    assert one(fleet, "Cluster members", "A") == members
    assert one(fleet, "Cluster members", "B") == len(REPLICAS)  # replicas scraped
    assert one(fleet, "Leaders") == 1
    assert one(fleet, "Failed observer verdicts") == 0
    probed = {s["metric"]["instance"]: float(s["value"][1])
              for s in got[(fleet, "Masters probed by replica", "A")]}
    assert len(probed) == members and sum(probed.values()) == len(MASTERS) * per_master
    leaders = {s["metric"]["instance"]: float(s["value"][1])
               for s in got[(fleet, "Leader by replica", "A")]}
    assert sorted(leaders.values()) == [0] * (members - 1) + [1]
    verdicts = got[(fleet, "Observer verdicts", "A")]
    assert len(verdicts) == len(MASTERS) * per_master
    assert {s["metric"]["master"] for s in verdicts} == set(MASTERS)
    assert all(v == 0 for v in _values(verdicts))
    failed_by = got[(fleet, "Observers that see each master failed", "A")]
    assert sorted(s["metric"]["master"] for s in failed_by) == MASTERS
    drawn = _per_master_targets()
    assert {(b, t) for b, t, _ in drawn} >= PER_MASTER
    for board, title, ref in drawn:
        masters = sorted(s["metric"].get("master") for s in got[(board, title, ref)])
        assert len(masters) == len(set(masters)), f"{board} [{title}] {ref}: {masters}"
        if (board, title) in PER_MASTER:
            assert masters == MASTERS, f"{board} [{title}] {ref}: {masters}"


async def _refuse(http: aiohttp.ClientSession, stack: ClusterStack, master: str,
                  observers: list[str]) -> None:
    """The simulated master answers these replicas' probes 503 (chaos), the others normally."""
    async with http.post(stack.urls[master] + "/chaos",
                         json={"refuse_observers": observers}) as resp:
        assert resp.status == 200, await resp.text()


async def _check_rules(prom: LivePrometheus) -> list[str]:
    """Every rule evaluates without error (e.g. many-to-many matching over the replicas'
    series); the names of the alerts pending or firing."""
    groups = (await prom.get("/api/v1/rules"))["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) > 30
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    return [a["labels"]["alertname"] for a in (await prom.get("/api/v1/alerts"))["alerts"]]


async def test_every_dashboard_query_counts_each_master_once_on_a_live_cluster(
        live_cluster: tuple[ClusterStack, LivePrometheus]) -> None:
    stack, prom = live_cluster
    await _settled(prom, len(REPLICAS))
    await _check_every_query(prom, len(REPLICAS))
    active = await _check_rules(prom)
    assert not set(active) & QUIET, active

    # One observer cut off from one master: its verdict says failed, the cluster (a quorum of
    # two) does not; the Cluster row shows it, no panel counts the master failed, the SLO
    # panels keep the observer that reaches it, HAMasterObserversDisagree is pending.
    first, _ = await prom.query('ha_master_observer_failed{job="ha-exporter", master="master-a"}')
    cut = first["metric"]["observer"]
    await _refuse(prom.http, stack, "master-a", [cut])

    async def disagree_pending() -> bool:
        return "HAMasterObserversDisagree" in await _check_rules(prom)

    await wait_for(disagree_pending, 30, "HAMasterObserversDisagree pending", poll=0.5)
    fleet = dict(((title, ref), expr) for title, ref, expr in _targets(FLEET, {"master": ".+"}))
    failed = await prom.query(fleet[("Observer verdicts", "A")])
    assert [(s["metric"]["master"], s["metric"]["observer"]) for s in failed
            if float(s["value"][1]) == 1] == [("master-a", cut)]
    assert _values(await prom.query(fleet[("Failed observer verdicts", "A")])) == [1]
    assert _values(await prom.query(fleet[("Masters failed", "A")])) == [0]
    assert _values(await prom.query(fleet[("Masters serving", "A")])) == [len(MASTERS)]
    slo = dict(((title, ref), expr) for title, ref, expr in
               _targets(ROOT / "dashboards" / "ha-exporter-slo.json", {"master": "master-a"}))
    assert _values(await prom.query(slo[("Availability (5m)", "A")])) == [1]
    active = await _check_rules(prom)
    assert not set(active) & (QUIET - {"HAMasterObserversDisagree"}), active
    await _refuse(prom.http, stack, "master-a", [])

    async def agreed() -> bool:
        return _values(await prom.query(fleet[("Failed observer verdicts", "A")])) == [0]

    await wait_for(agreed, 30, f"{cut} reaching master-a again", poll=0.5)

    # A follower dies: its lease expires, the others take its shard. The panels still count
    # every master once, the Cluster row shows two members of three replicas scraped, and
    # HAClusterMemberDown is pending on the live data.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        leader = await stack.settled_leader(http)
    victim = next(m for m in REPLICAS if m != leader)
    stack.replicas[victim].kill(signal.SIGKILL)

    async def member_down_pending() -> bool:
        return "HAClusterMemberDown" in await _check_rules(prom)

    await wait_for(member_down_pending, 30, "HAClusterMemberDown pending", poll=0.5)
    await _settled(prom, len(REPLICAS) - 1)
    await _check_every_query(prom, len(REPLICAS) - 1)
    active = await _check_rules(prom)
    assert not set(active) & (QUIET - {"HAClusterMemberDown"}), active
