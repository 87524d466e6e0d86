"""Helpers for tests that use real Prometheus-family binaries and the Grafana dashboards.

``require_binary`` makes a missing tool a failure under CI (CI=true) and a skip elsewhere, so
that a developer without promtool still runs the rest while CI can never pass by skipping.
``dashboard_queries`` gives every PromQL expression of a dashboard with its Grafana variables
substituted, ready to run against a real Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from exporter.metrics import DUTY_FAMILIES, OWNED_COUNTERS
from exporter.metrics.cluster import HELP as CLUSTER_HELP

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "dashboards"
RULES_DIR = ROOT / "alert_rules"

#: Debian package that ships each binary, for the message when it is missing.
PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "etcd": "etcd-server",
}

#: Values for Grafana's variables when a dashboard query is run outside Grafana.
DEFAULT_VARIABLES: dict[str, str] = {
    "datasource": "prometheus",
    "job": "ha-exporter",
    "master": ".+",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

#: The contract's minimum set of metrics (../shared/CONTRACT.md, README metrics reference).
CONTRACT_METRICS: frozenset[str] = frozenset({
    "ha_master_up", "ha_master_state", "ha_master_probe_duration_seconds",
    "ha_master_probes_total", "ha_master_consecutive_failures",
    "ha_master_last_probe_timestamp_seconds", "ha_master_info", "ha_master_queue_length",
    "ha_master_active_messages", "ha_master_cpu_percent", "ha_master_memory_percent",
    "ha_master_routing_weight", "ha_route_decisions_total", "ha_failovers_total",
    "ha_failover_duration_seconds", "ha_failover_in_progress", "ha_rebalances_total",
    "ha_fleet_health_score", "ha_load_distribution_quality", "ha_config_last_reload_success",
    "ha_build_info",
})
#: Exposed beyond the contract's minimum set (the duty families and store/checkpoint counters
#: of the contract's later sections among them), and used by the rules or dashboards.
EXTRA_METRICS: frozenset[str] = frozenset(
    {"ha_master_recovery_timed_out", "ha_master_needs_reset", "ha_probe_schedule_lag_seconds",
     "ha_probe_rounds_skipped_total"} | DUTY_FAMILIES | set(OWNED_COUNTERS) | set(CLUSTER_HELP)
)
#: Series every Prometheus has: target health and the alerts it evaluates.
BUILTIN_SERIES: frozenset[str] = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
HISTOGRAMS: frozenset[str] = frozenset(
    {"ha_master_probe_duration_seconds", "ha_failover_duration_seconds",
     "ha_probe_schedule_lag_seconds"})


def base_metric(name: str) -> str:
    """A histogram's series name back to its metric name (``_bucket``/``_sum``/``_count``)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def recording_rule_names() -> set[str]:
    """Names recorded by the checked-in rules."""
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


def unknown_metrics(names: set[str]) -> set[str]:
    """The names that are neither exposed metrics, recording rules nor built-in series."""
    known = CONTRACT_METRICS | EXTRA_METRICS | BUILTIN_SERIES | recording_rule_names()
    return {n for n in names if base_metric(n) not in known}


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, *alternatives: str) -> str:
    """Path of ``name`` (or of the first alternative installed, e.g. Debian's renamed binaries);
    fail under CI=true, else skip, when none is installed."""
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path:
            return path
    package = PACKAGES.get(name, name)
    message = f"{name} not found on PATH (Debian package {package!r})"
    if in_ci():
        pytest.fail(f"{message}: required when CI=true", pytrace=False)
    pytest.skip(f"{message}; install it to run this test (under CI=true this fails instead)")
    raise AssertionError("unreachable")  # skip() raises


def dashboard_paths() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]) by values; unknown ones raise."""
    table = {**DEFAULT_VARIABLES, **(values or {})}

    def repl(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in table:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return table[name]

    return _VARIABLE.sub(repl, expr)


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panels(path: Path) -> list[dict]:
    return _panels(json.loads(Path(path).read_text(encoding="utf-8")))


def dashboard_queries(path: Path | str, values: Mapping[str, str] | None = None,
                      raw: bool = False) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, then annotation queries.

    Variables are substituted with ``values`` over DEFAULT_VARIABLES (``raw=True`` keeps them).
    Variable definitions (label_values(...)) are Grafana syntax, not PromQL, and are left out.
    """
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    exprs = [
        target["expr"]
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    exprs += [
        a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")
    ]
    return exprs if raw else [substitute(e, values) for e in exprs]


_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording-rule names) an expression selects.

    A small lexer, enough for the rules and dashboards here: strings, label matchers, ranges
    and grouping clauses are dropped, then every identifier not called as a function is a name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _CLAUSE.sub(" ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names
