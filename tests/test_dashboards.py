"""Grafana dashboards: structure that makes them portable and honest.

Every panel must be selectable by datasource, carry a unit and a description, use
$__rate_interval in rate()/increase() (so that it never shows gaps at any zoom), and only query
metrics the exporter exposes or the rules record. Running every query against a real Prometheus
is the end-to-end test's job (tests.tools.dashboard_queries extracts them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.tools import (
    ROOT,
    dashboard_paths,
    dashboard_queries,
    metric_names,
    panels,
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
