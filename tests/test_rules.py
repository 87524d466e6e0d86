"""Alert and recording rules: rendered from the config, checked and unit-tested by promtool, and
routed by a real Alertmanager config (amtool, and inhibition on a running Alertmanager)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml

from exporter.config import Config, load_config, load_config_text
from exporter.metrics.cluster import HELP as CLUSTER_HELP
from exporter.rules import RUNBOOK_URL, render, render_texts
from tests.monitoring import _bound_address, _wait_up
from tests.processes import Processes
from tests.support import wait_for
from tests.tools import ROOT, RULES_DIR, metric_names, require_binary, unknown_metrics

EXAMPLE = ROOT / "examples" / "ha-exporter.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ROUTES_TESTS = ROOT / "deploy" / "alertmanager" / "routes-tests.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RERENDER = "ha-exporter render --config examples/ha-exporter.yml --out alert_rules"

#: Alerts about the fleet or the exporter as a whole; every other alert is about one master,
#: or about one duty.
FLEET_ALERTS = {
    "HANoHealthyBackup", "HANoMasterAvailable", "HAFailoverStuck", "HALoadImbalance",
    "HAExporterDown", "HAExporterAbsent", "HAConfigReloadFailed", "HAStateStoreFailing",
    "HAProbeEngineBehind", "HANotificationsFailing", "HAClusterNoLeader", "HAClusterMemberDown",
}
DUTY_ALERTS = {"HADutyUnserved", "HADutyMultipleHolders"}
#: The cluster families (exporter.metrics.cluster): exposed by replicas in cluster mode only.
CLUSTER_METRICS = frozenset(CLUSTER_HELP)

#: A config far from the defaults, to prove that the thresholds reach the rules and their tests.
OTHER_CONFIG = """
probe: {interval: 2s, timeout: 1s, failure_threshold: 4, recovery_threshold: 2}
masters:
  - {name: m1, url: "http://127.0.0.1:9301", role: active}
  - {name: m2, url: "http://127.0.0.1:9302", role: standby}
balancing: {rebalance: {imbalance_ratio: 4, for: 1m}}
failover: {recovery_timeout: 45s, deadline: 20s, max_recovery_attempts: 3}
thresholds: {queue_warning: 250, queue_critical: 900, probe_latency_warning: 300ms,
             slo_availability: 99.5%}
"""


@pytest.fixture(scope="module")
def example() -> Config:
    return load_config(EXAMPLE)


@pytest.fixture(scope="module")
def other() -> Config:
    return load_config_text(OTHER_CONFIG)


def _rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules(RULES_DIR / "alerts.yml") if "alert" in r]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# --- single source of truth -------------------------------------------------------------------

def test_checked_in_rules_are_the_render_of_the_example_config(example: Config) -> None:
    rendered = render_texts(example)
    on_disk = {
        p.relative_to(RULES_DIR).as_posix(): p.read_text(encoding="utf-8")
        for p in RULES_DIR.rglob("*.yml")
    }
    assert sorted(on_disk) == sorted(rendered), f"alert_rules/ has other files; run: {RERENDER}"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"alert_rules/{name} drifted; run: {RERENDER}"


def test_render_writes_every_file_it_returns(tmp_path: Path, example: Config) -> None:
    paths = render(example, tmp_path / "out")
    assert {p.relative_to(tmp_path / "out").as_posix() for p in paths} == set(render_texts(example))
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_cli_render_writes_the_same_files(tmp_path: Path, example: Config) -> None:
    from exporter.cli import main

    assert main(["render", "--config", str(EXAMPLE), "--out", str(tmp_path)]) == 0
    for name, text in render_texts(example).items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text


def test_thresholds_from_the_config_reach_the_rules(example: Config, other: Config) -> None:
    default, changed = render_texts(example)["alerts.yml"], render_texts(other)["alerts.yml"]
    assert default != changed
    assert "ha_master_queue_length{job=\"ha-exporter\"} > 250" in changed
    assert "ha_master_queue_length{job=\"ha-exporter\"} > 900" in changed
    assert ") > 0.3\n" in changed  # probe_latency_warning 300ms
    assert "(14.4 * 0.005)" in changed  # slo 99.5%
    assert "ha_load_distribution_quality{job=\"ha-exporter\"} < 25" in changed  # ratio 4
    down = next(r for r in yaml.safe_load(changed)["groups"][0]["rules"]
                if r["alert"] == "HAMasterDown")
    assert down["for"] == "8s"  # 4 failures x 2s
    recording = render_texts(other)["recording_rules.yml"]
    assert "vector(0.995)" in recording and "vector(0.005)" in recording


def _duty_rules(cfg: Config) -> dict[str, dict]:
    rules = yaml.safe_load(render_texts(cfg)["alerts.yml"])["groups"]
    return {r["alert"]: r for g in rules for r in g["rules"] if r.get("alert") in DUTY_ALERTS}


def test_duty_alerts_wait_for_detection_an_automatic_failover_and_one_probe(
        example: Config, other: Config) -> None:
    """for: = failure_threshold x interval + failover.deadline (when failover moves duties on
    its own) + one interval: long enough for a failover to restore a duty, no longer."""
    for cfg, expected in ((example, "50s"), (other, "30s")):  # 15+30+5; 8+20+2
        assert {r["for"] for r in _duty_rules(cfg).values()} == {expected}
    manual = load_config_text(OTHER_CONFIG.replace("failover: {", "failover: {enabled: false, "))
    dry = load_config_text(OTHER_CONFIG.replace("failover: {", "failover: {dry_run: true, "))
    for cfg in (manual, dry):  # nothing will move the duty: detection + one interval
        assert {r["for"] for r in _duty_rules(cfg).values()} == {"10s"}


def test_duty_alerts_hold_with_several_exporter_replicas(example: Config) -> None:
    """No instance in a duty alert's labels (one alert per duty, whichever replica sees it),
    max/count over replicas, never sum: a master reported by two replicas counts once."""
    rules = _duty_rules(example)
    assert rules["HADutyUnserved"]["expr"].startswith("max by (job, duty) (ha_duty_holders{")
    assert rules["HADutyMultipleHolders"]["expr"].startswith(
        "count by (job, duty) (max by (job, duty, master) (ha_duty_holder{")
    for rule in rules.values():
        assert "sum" not in rule["expr"] and "instance" not in rule["expr"]
        assert "$labels.instance" not in str(rule["annotations"])


#: Failover events counted over every replica: one alert per master (or kind), never per replica.
REPLICATED_EVENTS = {
    "HAFailoverStateLost": "max by (job, master) (",
    "HAFailoverRefused": "max by (job, master, rule) (",
    "HANotificationsFailing": "max by (job, kind) (",
}


def test_state_and_notification_alerts_hold_with_several_exporter_replicas() -> None:
    """Max over replicas, never sum, and no instance: a move (or a failed notification) seen
    on two replicas is one alert; both branches (increase, and a series born at 1) are kept."""
    rules = {r["alert"]: r for r in _alerts() if r["alert"] in REPLICATED_EVENTS}
    assert set(rules) == set(REPLICATED_EVENTS)
    for name, head in REPLICATED_EVENTS.items():
        expr = rules[name]["expr"]
        assert expr.startswith(head), name
        assert "sum" not in expr and "instance" not in expr, name
        assert "increase(" in expr and "unless" in expr and "offset 15m" in expr, name
        assert "$labels.instance" not in str(rules[name]["annotations"]), name
    assert 'result="success", state_source="none"' in rules["HAFailoverStateLost"]["expr"]


#: Alerts about a master or the fleet built from per-master or fleet-level gauges: a single-node
#: branch (as before, per instance) and a cluster branch merged over the replicas, and how the
#: cluster branch merges them (the outer aggregation, and over what).
TWO_BRANCH_ALERTS = {
    "HAMasterDown": "max by (job, master) (",
    "HAMasterDegraded": "max by (job, master) (",
    "HAMasterRecoveryTimeout": "max by (job, master) (",
    "HAMasterProbeLatencyHigh": "min by (job, master) (",
    "HAMasterQueueBacklog": "max by (job, master) (",
    "HANoHealthyBackup": "count by (job) (max by (job, master) (",
    "HANoMasterAvailable": "count by (job) (",
    "HALoadImbalance": "max by (job) (",
    "HAMasterErrorBudgetBurn": "min by (job, master) (",
}
SINGLE_BRANCH = 'unless on (job, instance) ha_cluster_members{job="ha-exporter"}'
CLUSTER_JOIN = 'and on (job, instance) ha_cluster_members{job="ha-exporter"}'


def _branches(expr: str) -> tuple[str, str]:
    """(single-node branch, cluster branch): the expression split at its top-level ``or``."""
    single, sep, cluster = expr.partition(f"\n{SINGLE_BRANCH}\nor\n".replace("\nu", "\n  u"))
    assert sep, f"no single-node branch ending in {SINGLE_BRANCH!r}, then or: {expr}"
    return single, cluster


def test_master_and_fleet_alerts_have_a_single_node_and_a_cluster_branch() -> None:
    """Single node: the expression as it was, per instance, for targets without
    ha_cluster_members. Cluster: only the replicas' series (joined on ha_cluster_members),
    merged per master or job with max/min, no instance left, never a sum over replicas (a sum
    by instance, within one replica, is fine)."""
    rules = [r for r in _alerts() if r["alert"] in TWO_BRANCH_ALERTS]
    assert {r["alert"] for r in rules} == set(TWO_BRANCH_ALERTS)
    for rule in rules:
        name = rule["alert"]
        single, cluster = _branches(rule["expr"])
        assert "ha_cluster_members" not in single, name
        assert cluster.lstrip("( \n").startswith(TWO_BRANCH_ALERTS[name]), (name, cluster)
        # every selector of the cluster branch is restricted to cluster replicas
        selectors = re.findall(r"\b(?:ha_|master:)[\w:]*\{[^}]*\}", cluster)
        joined = cluster.count(CLUSTER_JOIN)
        assert joined and joined == len(selectors) - joined, (name, cluster)
        for func, grouping in re.findall(r"\b(sum|max|min|count) by \(([^)]*)\)", cluster):
            labels = {label.strip() for label in grouping.split(",")}
            if func == "sum":  # only within one replica: a histogram's buckets
                assert "instance" in labels, f"{name}: a sum over replicas: {grouping}"
            else:
                assert "instance" not in labels, f"{name}: one alert per replica: {grouping}"
        annotations = str(rule["annotations"])
        for use in re.findall(r"\{\{[^}]*\$labels\.instance[^}]*\}\}", annotations):
            assert use == "{{ with $labels.instance }}", f"{name}: {use} is empty in a cluster"


def test_cluster_alerts_select_only_series_of_cluster_replicas() -> None:
    """HAClusterNoLeader, HAClusterMemberDown and HAMasterObserversDisagree read families
    that only cluster replicas expose, so a single node can never fire them."""
    rules = {r["alert"]: r for r in _alerts()
             if r["alert"] in {"HAClusterNoLeader", "HAClusterMemberDown",
                               "HAMasterObserversDisagree"}}
    assert len(rules) == 3
    for name, rule in rules.items():
        names = metric_names(rule["expr"])
        assert names & CLUSTER_METRICS, name
        if name != "HAMasterObserversDisagree":
            assert "master" not in rule["expr"], f"{name}: about the cluster, not a master"
    assert rules["HAClusterNoLeader"]["expr"].strip() == (
        'sum by (job) (ha_cluster_leader{job="ha-exporter"}) != 1')
    assert rules["HAClusterNoLeader"]["for"] == "1m"
    assert rules["HAClusterMemberDown"]["expr"].strip() == (
        'min by (job) (ha_cluster_members{job="ha-exporter"}) < count by (job) '
        '(up{job="ha-exporter"})')


# --- conventions ------------------------------------------------------------------------------

def test_alerts_follow_the_mixin_conventions() -> None:
    alerts = _alerts()
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"HA(?:[A-Z][a-z0-9]*)+", name), f"{name}: CamelCase with prefix HA"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert "{{ $labels." in ann["summary"] + ann["description"], f"{name}: templated"
        assert ann["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}", name
        if name in DUTY_ALERTS:
            assert "$labels.duty" in ann["summary"], f"{name}: per-duty alert names it"
        elif name not in FLEET_ALERTS:
            assert "$labels.master" in ann["summary"], f"{name}: per-master alert names it"


def test_required_alerts_exist_with_the_intended_severity() -> None:
    severities: dict[str, set[str]] = {}
    for rule in _alerts():
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    assert severities == {
        "HAMasterDown": {"critical"},
        "HAMasterDegraded": {"warning"},
        "HAMasterRecoveryTimeout": {"critical"},
        "HAMasterProbeLatencyHigh": {"warning"},
        "HAMasterQueueBacklog": {"warning", "critical"},
        "HANoHealthyBackup": {"warning"},
        "HANoMasterAvailable": {"critical"},
        "HAFailoverExecuted": {"info"},
        "HAFailoverFailed": {"critical"},
        "HAFailoverStateLost": {"critical"},
        "HAFailoverRefused": {"warning"},
        "HANotificationsFailing": {"warning"},
        "HAFailoverStuck": {"critical"},
        "HALoadImbalance": {"warning"},
        "HAExporterDown": {"critical"},
        "HAExporterAbsent": {"critical"},
        "HAConfigReloadFailed": {"warning"},
        "HAMasterErrorBudgetBurn": {"critical", "warning"},
        "HADutyUnserved": {"critical"},
        "HADutyMultipleHolders": {"critical"},
        "HAStateStoreFailing": {"critical"},
        "HAProbeEngineBehind": {"warning"},
        "HAClusterNoLeader": {"critical"},
        "HAClusterMemberDown": {"warning"},
        "HAMasterObserversDisagree": {"warning"},
    }


def test_burn_rate_alerts_use_the_workbook_windows() -> None:
    burns = {(r["labels"]["long"], r["labels"]["short"]): r for r in _alerts()
             if r["alert"] == "HAMasterErrorBudgetBurn"}
    expected = {("1h", "5m"): ("14.4", "critical"), ("6h", "30m"): ("6", "critical"),
                ("1d", "2h"): ("3", "warning"), ("3d", "6h"): ("1", "warning")}
    assert set(burns) == set(expected)
    for (long, short), (factor, severity) in expected.items():
        rule = burns[(long, short)]
        assert rule["labels"]["severity"] == severity
        assert f"ratio_rate{long}{{" in rule["expr"] and f"ratio_rate{short}{{" in rule["expr"]
        # both windows, in the single-node branch and in the cluster one
        assert rule["expr"].count(f"> ({factor} * 0.001)") == 4


def test_recording_rules_are_named_level_metric_operations() -> None:
    records = [r["record"] for r in _rules(RULES_DIR / "recording_rules.yml")]
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        assert f"master:ha_probe_errors:ratio_rate{window}" in records
    for name in records:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name


def test_rules_use_only_exposed_metrics() -> None:
    names: set[str] = set()
    for path in RULES_DIR.glob("*.yml"):
        for rule in _rules(path):
            names |= metric_names(rule["expr"])
    assert not unknown_metrics(names)


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section() -> None:
    anchors = {_github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines()
               if line.startswith("## ")}
    for rule in _alerts():
        assert rule["annotations"]["runbook_url"].split("#", 1)[1] in anchors, rule["alert"]


def test_every_alert_and_recording_rule_has_unit_tests() -> None:
    fires, silent, exprs = set(), set(), ""
    for path in (RULES_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
            exprs += " ".join(c["expr"] for c in case.get("promql_expr_test", []))
    names = {r["alert"] for r in _alerts()}
    assert names <= fires, f"never tested firing: {names - fires}"
    assert names <= silent, f"never tested silent: {names - silent}"
    for record in (r["record"] for r in _rules(RULES_DIR / "recording_rules.yml")):
        assert re.search(rf"\b{re.escape(record)}\b", exprs), f"{record} has no promql_expr_test"


# --- promtool ---------------------------------------------------------------------------------

def _promtool_check_and_test(directory: Path) -> None:
    promtool = require_binary("promtool")
    rules = sorted(str(p) for p in directory.glob("*.yml"))
    tests = sorted(str(p) for p in (directory / "tests").glob("*.yml"))
    assert rules and tests
    checked = _run(promtool, "check", "rules", *rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", *tests)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_checks_and_tests_the_checked_in_rules() -> None:
    _promtool_check_and_test(RULES_DIR)


def test_promtool_checks_and_tests_a_render_of_another_config(tmp_path: Path,
                                                              other: Config) -> None:
    render(other, tmp_path)
    _promtool_check_and_test(tmp_path)


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_binary("promtool")
    checked = _run(promtool, "check", "config", str(PROMETHEUS_YML))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 rule files found" in checked.stdout


# --- Alertmanager -----------------------------------------------------------------------------

def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = require_binary("amtool")
    checked = _run(amtool, "check-config", str(ALERTMANAGER_YML))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alertmanager_routes_by_alertname_and_master() -> None:
    route = yaml.safe_load(ALERTMANAGER_YML.read_text())["route"]
    assert route["group_by"] == ["alertname", "master"]
    receivers = yaml.safe_load(ALERTMANAGER_YML.read_text())["receivers"]
    for receiver in receivers:
        for hook in receiver["webhook_configs"]:
            assert hook["send_resolved"] is True, receiver["name"]


ROUTE_CASES = yaml.safe_load(ROUTES_TESTS.read_text())


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c["name"] for c in ROUTE_CASES])
def test_amtool_routes(case: dict) -> None:
    amtool = require_binary("amtool")
    labels = [f"{k}={v}" for k, v in case["labels"].items()]
    result = _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}",
                  f"--verify.receivers={','.join(case['receivers'])}", *labels)
    assert result.returncode == 0, f"{case['name']}: {result.stdout}{result.stderr}"


def _http_json(url: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


async def test_critical_inhibits_warning_for_the_same_master_on_a_real_alertmanager(
        tmp_path: Path, processes: Processes, http: aiohttp.ClientSession) -> None:
    binary = require_binary("alertmanager", "prometheus-alertmanager")
    # as tests.monitoring starts it: port 0, the bound address read back from its log
    alertmanager = processes.start(
        [binary, f"--config.file={ALERTMANAGER_YML}", f"--storage.path={tmp_path / 'am-data'}",
         "--web.listen-address=127.0.0.1:0", "--cluster.listen-address="],
        "alertmanager")
    address = await _bound_address(alertmanager)
    assert not address.endswith(":0"), "this Alertmanager does not say its port"
    base = f"http://{address}"
    await _wait_up(http, alertmanager, f"{base}/-/ready", timeout=20)
    now = datetime.now(UTC).isoformat()
    sent = [
        {"alertname": "HAMasterDown", "severity": "critical", "master": "master-a"},
        {"alertname": "HAMasterDegraded", "severity": "warning", "master": "master-a"},
        {"alertname": "HAMasterDegraded", "severity": "warning", "master": "master-b"},
        {"alertname": "HAMasterErrorBudgetBurn", "severity": "critical", "master": "master-a",
         "long": "1h", "short": "5m"},
        {"alertname": "HAExporterDown", "severity": "critical", "instance": "x:9108"},
        {"alertname": "HANoHealthyBackup", "severity": "warning", "instance": "x:9108"},
    ]
    _http_json(f"{base}/api/v2/alerts", [{"labels": s, "startsAt": now} for s in sent])

    expected = {
        ("HAMasterDown", "master-a"): "active",
        ("HAMasterDegraded", "master-a"): "suppressed",  # critical on the same master
        ("HAMasterDegraded", "master-b"): "active",  # another master: not inhibited
        ("HAMasterErrorBudgetBurn", "master-a"): "suppressed",  # the down page says it
        ("HAExporterDown", None): "active",
        ("HANoHealthyBackup", None): "active",  # no master label: nothing to match
    }
    seen: list[dict] = []

    def states() -> dict | None:
        """Alertmanager's view once it holds every alert and has evaluated inhibition (it
        does so apart from receiving them: an alert can read active for a moment)."""
        got = _http_json(f"{base}/api/v2/alerts")
        assert isinstance(got, list)
        state = {(a["labels"]["alertname"], a["labels"].get("master")): a["status"]["state"]
                 for a in got}
        seen[:] = [state]
        return state if state == expected else None

    try:
        await wait_for(states, 10, "alertmanager's inhibition of the same master's alerts",
                       poll=0.1)
    except AssertionError:
        assert seen and seen[0] == expected  # the last view, shown against the expected one
