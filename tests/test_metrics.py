"""/metrics as Prometheus sees it: every contract family with its labels, promtool-clean."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
from collections.abc import Callable
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import MasterConfig, ProbeConfig, parse_config
from exporter.fleet import Fleet, Outcome, Result
from exporter.logs import ThrottledLog
from exporter.metrics import (
    OM_CONTENT_TYPE,
    ExporterMetrics,
    FleetCollector,
    MappingCounter,
    content_type,
    escape,
    fmt,
    sample_value,
    wants_openmetrics,
)
from exporter.metrics import registry as registry_module
from exporter.routing.router import Router
from exporter.service import Service
from exporter.sim import SimulatedMaster
from exporter.sim import create_app as master_app
from exporter.web.app import create_app
from exporter.web.server import running
from tests.support import closed_port, serve_app, wait_for
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
DECLARED = {"ha_route_decisions", "ha_failovers", "ha_failover_duration_seconds", "ha_rebalances",
            "ha_failover_refusals", "ha_notification_failures"}
WEIRD = 'we"ird\\name'
#: The master behind each path of health_app: the two active ones serve their own duty.
NAMES = {"alpha": "alpha", "weird": WEIRD, "dead": "dead"}


def health_app() -> web.Application:
    async def health(request: web.Request) -> web.Response:
        who = request.match_info["who"]
        if who == "dead":
            return web.json_response({"status": "down"})
        return web.json_response(
            {
                "status": "ok",
                "queue_length": 4,
                "active_messages": 2,
                "cpu_percent": 21.5,
                "memory_percent": 33.0,
                "active": True,
                "duties": [NAMES[who]],
            }
        )

    app = web.Application()
    app.router.add_get("/{who}/health", health)
    return app


async def scrape_service(
    tmp_path, accept: str | None = None, prepare: Callable[[Service], None] | None = None
) -> tuple[str, str]:
    """One scrape of a running service once its down master is failed; ``prepare`` runs on
    the started service first."""
    async with serve_app(health_app()) as url:
        cfg = parse_config(
            {
                "state_path": str(tmp_path / "state.db"),
                "probe": {"interval": "300ms", "timeout": "200ms", "failure_threshold": 1},
                "masters": [
                    {"name": "alpha", "url": f"{url}/alpha", "region": "uae", "priority": 1},
                    {"name": WEIRD, "url": f"{url}/weird", "region": "usa"},
                    {"name": "dead", "url": f"{url}/dead", "region": "usa", "role": "standby"},
                ],
            }
        )
        svc = Service(cfg, token="t")
        async with running(svc, "127.0.0.1", 0) as server:
            if prepare is not None:
                prepare(svc)
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
    # two of three masters serve; both duties (alpha's and the weird one's) are served
    assert samples[("ha_fleet_health_score", ())] == pytest.approx(200 / 3)
    duties = {k: v for k, v in samples.items() if k[0].startswith("ha_duty_")}
    assert duties == {
        ("ha_duty_served", (("duty", "alpha"),)): 1,
        ("ha_duty_served", (("duty", WEIRD),)): 1,
        ("ha_duty_holders", (("duty", "alpha"),)): 1,
        ("ha_duty_holders", (("duty", WEIRD),)): 1,
        ("ha_duty_holder", (("duty", "alpha"), ("master", "alpha"))): 1,
        ("ha_duty_holder", (("duty", WEIRD), ("master", WEIRD))): 1,
    }
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
    metrics = ExporterMetrics(collector, duties=failing)  # type: ignore[arg-type]
    # a counter may not be NaN, negative or infinite, and its labels must fit: dropped
    store_errors = {"write": 2, "read": math.nan, "scan": -1, "sync": math.inf, ("a", "b"): 1}
    metrics.add_counter("ha_state_store_errors_total", "Store errors.", ["op"],
                        lambda: store_errors)
    metrics.add_counter("ha_master_checkpoint_failures_total", "Checkpoint failures.",
                        ["master", "reason"], failing)  # type: ignore[arg-type]
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
    store = [(s.name, s.labels, s.value) for s in families["ha_state_store_errors"].samples]
    assert store == [("ha_state_store_errors_total", {"op": "write"}, 2)]
    assert "ha_master_checkpoint_failures" not in families  # its source failed
    assert not [n for n in families if n.startswith("ha_duty_")]  # the duty status failed
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


# --- duties, the health score, counters kept by other components ------------------------------


def duty_service(tmp_path) -> Service:
    """A service (not started) over a, b active and c, d standby; records are fed by hand."""
    cfg = parse_config({
        "state_path": str(tmp_path / "state.db"),
        "masters": [
            {"name": n, "url": f"http://127.0.0.1:{9001 + i}",
             "role": "active" if n in "ab" else "standby"}
            for i, n in enumerate("abcd")
        ],
    })
    return Service(cfg, token="t")


def report(svc: Service, name: str, **payload: object) -> None:
    """One successful probe of ``name`` answering ``payload``."""
    outcome = Outcome(Result.SUCCESS, 0.01, payload={"status": "ok", **payload})
    svc.fleet.get(name).apply(outcome, 1000.0)


def scraped(svc: Service) -> dict[tuple[str, tuple], float]:
    text = svc.metrics.render(None)[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith(("ha_duty_", "ha_fleet_health_score"))
    }


def test_health_score_is_the_lower_of_masters_serving_and_duties_served(tmp_path):
    svc = duty_service(tmp_path)
    try:
        def score() -> float:
            value = scraped(svc)[("ha_fleet_health_score", ())]
            assert value == pytest.approx(svc.fleet_health_score())  # the page shows the same
            return value

        report(svc, "a", active=True, duties=["a"])
        report(svc, "b", active=True, duties=["b"])
        for name in "cd":
            report(svc, name, active=False, duties=[])
        assert score() == 100
        report(svc, "b", active=False, duties=[])  # b stops serving behind the exporter's back
        assert score() == 50  # every master healthy, one duty of two unserved
        for _ in range(3):  # c fails (failure_threshold 3): masters at 75, duties still at 50
            svc.fleet.get("c").apply(Outcome(Result.CONNECT_ERROR, 0.01, detail="refused"), 1.0)
        assert score() == 50
        report(svc, "b", active=True, duties=["b"])
        assert score() == 75  # all duties served: the failed standby is what is left
        report(svc, "d", active=True, duties=["a"])  # a second holder of a: split brain
        assert score() == 50
        assert svc.duty_status().split == ["a"]
        report(svc, "a", active=False, duties=[])
        report(svc, "b", active=False, duties=[])
        report(svc, "d", active=False, duties=[])
        assert score() == 0  # nothing served: an outage, however green the masters are
    finally:
        svc.store.close()


def test_duty_families_follow_what_the_masters_report(tmp_path):
    svc = duty_service(tmp_path)
    try:
        report(svc, "a", active=True, duties=["a"])
        report(svc, "b", active=True, duties=["b"])
        report(svc, "c", active=True, duties=["b", "not-a-duty"])  # split; unknown ignored
        got = scraped(svc)
        assert {k: v for k, v in got.items() if k[0] != "ha_fleet_health_score"} == {
            ("ha_duty_served", (("duty", "a"),)): 1,
            ("ha_duty_served", (("duty", "b"),)): 0,
            ("ha_duty_holders", (("duty", "a"),)): 1,
            ("ha_duty_holders", (("duty", "b"),)): 2,
            ("ha_duty_holder", (("duty", "a"), ("master", "a"))): 1,
            ("ha_duty_holder", (("duty", "b"), ("master", "b"))): 1,
            ("ha_duty_holder", (("duty", "b"), ("master", "c"))): 1,
        }
        # a master that stops answering serves nothing it may still claim
        svc.fleet.get("a").apply(Outcome(Result.TIMEOUT, 0.3, detail="timeout"), 2.0)
        got = scraped(svc)
        assert got[("ha_duty_served", (("duty", "a"),))] == 0
        assert got[("ha_duty_holders", (("duty", "a"),))] == 0
        assert ("ha_duty_holder", (("duty", "a"), ("master", "a"))) not in got
    finally:
        svc.store.close()


def test_the_duty_status_is_computed_once_per_scrape(tmp_path):
    svc = duty_service(tmp_path)
    try:
        calls = []
        original = svc.duty_status

        def counted():
            calls.append(1)
            return original()

        svc.metrics._duties = counted
        svc.metrics.render(None)
        assert len(calls) == 1  # the duty families and the health score share it
    finally:
        svc.store.close()


async def test_store_errors_and_checkpoint_failures_are_counters(tmp_path, monkeypatch):
    """Both are read from counts their owners keep (store.errors, checkpoints.failures)."""

    def counts(owner: object, name: str, value: object) -> None:
        """``owner.name`` reads ``value``: a property on its class wins over an instance
        attribute, and a read-only property is replaced as well."""
        monkeypatch.setattr(type(owner), name, property(lambda _self: value), raising=False)

    def prepare(svc: Service) -> None:
        counts(svc.store, "errors", {"write": 3, "read": 0})
        assert svc.failover is not None
        counts(svc.failover.checkpoints, "failures",
               {("alpha", "timeout"): 2, (WEIRD, "bad checksum"): 1})

    text, _ = await scrape_service(tmp_path, prepare=prepare)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["ha_state_store_errors"].type == "counter"
    assert {s.labels["op"]: s.value for s in families["ha_state_store_errors"].samples} == {
        "write": 3, "read": 0}
    fails = families["ha_master_checkpoint_failures"]
    assert fails.type == "counter"
    assert {(s.labels["master"], s.labels["reason"]): s.value for s in fails.samples} == {
        ("alpha", "timeout"): 2, (WEIRD, "bad checksum"): 1}
    assert "ha_master_checkpoint_failures_total{master=\"alpha\",reason=\"timeout\"} 2.0" in text
    promtool = require_binary("promtool")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


async def test_a_refusal_and_a_failed_notification_are_counted_on_metrics(tmp_path):
    """Driven for real: master-a is down from the start, so neither it nor any checkpoint has
    its state, and failover.require_state (the default) refuses to activate a backup without
    it. A refused move ran, so it is notified, and both receivers listen on closed ports."""
    sims = [SimulatedMaster("master-a", "uae"), SimulatedMaster("master-b", "usa"),
            SimulatedMaster("master-c", "uae", "standby")]
    sims[0].mode = "down"  # /health says down, every other call answers 503
    async with serve_app(master_app(sims[0])) as ua, serve_app(master_app(sims[1])) as ub, \
            serve_app(master_app(sims[2])) as uc, aiohttp.ClientSession() as http:
        cfg = parse_config({
            "state_path": str(tmp_path / "state.db"),
            "probe": {"interval": "200ms", "timeout": "150ms", "failure_threshold": 2},
            "masters": [
                {"name": "master-a", "url": ua, "region": "uae", "priority": 1},
                {"name": "master-b", "url": ub, "region": "usa", "priority": 2},
                {"name": "master-c", "url": uc, "region": "uae", "role": "standby",
                 "priority": 3},
            ],
            # a long cooldown: the refused move is not retried within the test
            "failover": {"enabled": True, "cooldown": "10m", "checkpoint_interval": "500ms",
                         "post_hook": {"url": f"http://127.0.0.1:{closed_port()}/hook"}},
            "alertmanager": {"url": f"http://127.0.0.1:{closed_port()}"},
        })
        assert cfg.failover.require_state
        svc = Service(cfg, token="t")
        async with running(svc, "127.0.0.1", 0) as server:
            base = f"http://127.0.0.1:{server.port}"

            async def scrape() -> str:
                async with http.get(f"{base}/metrics") as r:
                    return await r.text()

            before = await scrape()  # the manager exists: both families, no sample yet
            for name in ("ha_failover_refusals_total", "ha_notification_failures_total"):
                assert f"# TYPE {name} counter" in before and f"{name}{{" not in before
            fo = svc.failover
            assert fo is not None
            await wait_for(lambda: fo.stats.refusals, 10, "the failover of master-a refused")
            await wait_for(lambda: len(fo.notifier.failures) == 2, 10,
                           "both notifications of the refused move to fail")
            text = await scrape()
            [record] = svc.store.list_failovers(limit=5, brief=True)
    assert (record["master"], record["result"]) == ("master-a", "failed")
    assert "refused by failover.require_state" in record["reason"]
    assert not sims[2].active  # nobody was activated without the state
    families = {f.name: f for f in text_string_to_metric_families(text)}
    refusals = families["ha_failover_refusals"]
    assert refusals.type == "counter"
    assert [(s.name, s.labels, s.value) for s in refusals.samples] == [
        ("ha_failover_refusals_total", {"master": "master-a", "rule": "require_state"}, 1)]
    notifications = families["ha_notification_failures"]
    assert notifications.type == "counter"
    assert {s.labels["kind"]: s.value for s in notifications.samples} == {
        "post_hook": 1, "alertmanager": 1}
    assert ('ha_failovers_total{master="master-a",result="failed",state_source="none"} 1.0'
            in text)  # the refusal is a failed move that carried no state
    promtool = require_binary("promtool")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_a_counter_whose_owner_keeps_no_counts_is_not_rendered(tmp_path):
    svc = duty_service(tmp_path)
    try:
        svc.metrics.add_counter("ha_test_absent_total", "Absent.", ["x"], lambda: None)
        svc.metrics.add_counter("ha_test_empty_total", "Empty.", ["x"], dict)
        text = svc.metrics.render(None)[0].decode()
        assert "ha_test_absent" not in text
        assert "# TYPE ha_test_empty_total counter" in text  # declared, no sample yet
        # before the failover manager exists there is nothing to read its counts from
        for name in ("ha_master_checkpoint_failures", "ha_failover_refusals",
                     "ha_notification_failures"):
            assert f"# TYPE {name}_total" not in text, name
    finally:
        svc.store.close()


# --- streaming: pieces, the event loop, one moment per master -----------------------------------


def fleet_service(tmp_path, n: int) -> Service:
    """A service (not started) over ``n`` masters, every one probed once (two kinds of answer)."""
    cfg = parse_config({
        "state_path": str(tmp_path / "state.db"),
        "masters": [
            {"name": f"m{i:05d}", "url": f"http://127.0.0.1:9/m{i}",
             "region": ("uae", "usa")[i % 2], "role": "standby" if i % 4 == 3 else "active"}
            for i in range(n)
        ],
    })
    svc = Service(cfg, token="t")
    for i, rt in enumerate(svc.fleet):
        payload = {"status": "ok", "queue_length": i % 7, "cpu_percent": 12.5 + i % 3,
                   "memory_percent": 40.0, "active": i % 4 != 3, "duties": [rt.name]}
        rt.apply(Outcome(Result.SUCCESS, 0.002 * (i % 5), payload=payload), 1000.0 + i)
    return svc


def without_process(text: str) -> str:
    """The exposition without the process collector's samples (they move between scrapes)."""
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("process_"))


async def collect_stream(metrics: ExporterMetrics, openmetrics: bool) -> bytes:
    return b"".join([data async for data in metrics.stream(openmetrics)])


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0"])
async def test_the_streamed_scrape_is_the_rendered_one(tmp_path, accept):
    svc = fleet_service(tmp_path, 1200)  # three pieces of masters
    try:
        svc.metrics.add_counter(
            "ha_test_per_master_total", "A count per master.", ["master", "reason"],
            lambda: {(f"m{i:05d}", "timeout"): i for i in range(2500)},  # three pieces too
        )
        body, ctype = svc.metrics.render(accept)
        streamed = await collect_stream(svc.metrics, wants_openmetrics(accept))
        assert ctype == content_type(wants_openmetrics(accept))
        assert without_process(streamed.decode()) == without_process(body.decode())
        assert body.decode().count("ha_master_up{") == 1200
    finally:
        svc.store.close()


async def test_a_streamed_scrape_hands_the_event_loop_back(tmp_path, monkeypatch):
    """Every piece is a chance for the loop (SLICE 0 here); a task that only runs when the
    loop gets it back keeps running through a scrape of 1,200 masters."""
    monkeypatch.setattr(registry_module, "SLICE", 0.0)
    svc = fleet_service(tmp_path, 1200)
    try:
        ran = 0
        done = False

        async def other() -> None:
            nonlocal ran
            while not done:
                ran += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        started = ran
        await collect_stream(svc.metrics, False)
        during = ran - started
        done = True
        await task
        pieces = sum(1 for _ in svc.metrics.chunks(False))
        assert during >= pieces // 2 > 40, (during, pieces)
    finally:
        svc.store.close()


def test_each_master_is_written_from_one_moment(tmp_path):
    """Probes land between every two pieces of a scrape (as they do while /metrics hands the
    loop back); each master's families still agree with each other: all are from the moment
    its numbers were copied."""
    svc = fleet_service(tmp_path, 1100)
    try:
        applied = {rt.name: 1 for rt in svc.fleet}

        def probe_everyone() -> None:
            for rt in svc.fleet:
                k = applied[rt.name] = applied[rt.name] + 1
                ok = k % 2 == 1  # odd probes succeed, even ones time out
                outcome = (Outcome(Result.SUCCESS, 0.004, payload={"status": "ok"}) if ok
                           else Outcome(Result.TIMEOUT, 2.0, detail="timeout"))
                rt.apply(outcome, 1000.0 + k)

        pieces = []
        for piece in svc.metrics.chunks(False):
            pieces.append(piece)
            probe_everyone()
        text = "".join(pieces)
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        seen = set()
        for rt in svc.fleet:
            m = (("master", rt.name),)
            k = values[("ha_master_probe_duration_seconds_count", m)]
            assert k == values[("ha_master_probes_total", (*m, ("result", "success")))] + values[
                ("ha_master_probes_total", (*m, ("result", "timeout")))]
            assert values[("ha_master_last_probe_timestamp_seconds", m)] == 1000.0 + k
            up = values[("ha_master_up", (*m, ("region", rt.config.region),
                                          ("role", rt.config.role)))]
            assert up == (1 if k % 2 == 1 else 0), rt.name
            assert values[("ha_master_consecutive_failures", m)] == (0 if k % 2 == 1 else 1)
            seen.add(k)
        assert len(seen) > 1  # the fleet did move during the scrape
    finally:
        svc.store.close()


async def test_metrics_are_streamed_over_http_and_a_scraper_may_leave_early(tmp_path, caplog):
    svc = fleet_service(tmp_path, 1500)
    try:
        async with serve_app(create_app(svc)) as url, aiohttp.ClientSession() as s:
            async with s.get(f"{url}/metrics") as r:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                text = await r.text()
            assert without_process(text) == without_process(svc.metrics.render(None)[0].decode())
            with caplog.at_level(logging.DEBUG, logger="exporter"):
                async with s.get(f"{url}/metrics") as r:
                    await r.content.readany()
                    r.close()  # a scraper that gives up mid-body (its scrape_timeout)
                async with s.get(f"{url}/metrics") as r:
                    assert r.status == 200 and (await r.text()).count("ha_master_up{") == 1500
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    finally:
        svc.store.close()


# --- the probe engine's lateness ----------------------------------------------------------------


def engine(**figures: object) -> SimpleNamespace:
    """A prober with the read-only figures /metrics reads (lag per bucket, +Inf last)."""
    base: dict[str, object] = {"lag_buckets": (0.001, 0.01, 0.1), "lag_counts": [5, 3, 1, 1],
                               "lag_sum": 0.5, "rounds_skipped": 7}
    return SimpleNamespace(**{**base, **figures})


def test_probe_engine_lateness_is_a_histogram_and_a_counter(tmp_path):
    svc = duty_service(tmp_path)
    try:
        prober = engine()
        svc.prober = prober  # the figures the service reads from its prober at scrape time
        text = svc.metrics.render(None)[0].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        lag = families["ha_probe_schedule_lag_seconds"]
        assert lag.type == "histogram" and "late" in lag.documentation
        samples = {(s.name, s.labels.get("le")): s.value for s in lag.samples}
        assert samples == {
            ("ha_probe_schedule_lag_seconds_bucket", "0.001"): 5,
            ("ha_probe_schedule_lag_seconds_bucket", "0.01"): 8,
            ("ha_probe_schedule_lag_seconds_bucket", "0.1"): 9,
            ("ha_probe_schedule_lag_seconds_bucket", "+Inf"): 10,
            ("ha_probe_schedule_lag_seconds_count", None): 10,
            ("ha_probe_schedule_lag_seconds_sum", None): 0.5,
        }
        skipped = families["ha_probe_rounds_skipped"]
        assert skipped.type == "counter"
        assert [(s.name, s.value) for s in skipped.samples] == [
            ("ha_probe_rounds_skipped_total", 7)]
        prober.lag_counts[0] += 2  # the engine counts on in place; the next scrape sees it
        prober.rounds_skipped = 9
        om = svc.metrics.render("application/openmetrics-text; version=1.0.0")[0].decode()
        om_families = {f.name: f for f in om_parser.text_string_to_metric_families(om)}
        assert {s.value for s in om_families["ha_probe_rounds_skipped"].samples} == {9}
        inf = [s for s in om_families["ha_probe_schedule_lag_seconds"].samples
               if s.labels.get("le") == "+Inf"]
        assert inf[0].value == 12
        promtool = require_binary("promtool")
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    finally:
        svc.store.close()


@pytest.mark.parametrize(
    ("prober", "present"),
    [
        (None, set()),  # before the prober exists
        (object(), set()),  # a prober that keeps no such figures
        (SimpleNamespace(rounds_skipped=3), {"ha_probe_rounds_skipped"}),
        (engine(lag_counts=[1, 2]), {"ha_probe_rounds_skipped"}),  # one count per bucket + Inf
        (engine(lag_counts=[1, -2, 0, 0]), {"ha_probe_rounds_skipped"}),
        (engine(lag_sum=math.inf), {"ha_probe_rounds_skipped"}),
        (engine(lag_buckets=(0.1, 0.01, 1.0)), {"ha_probe_rounds_skipped"}),
        (engine(rounds_skipped=-1), {"ha_probe_schedule_lag_seconds"}),
        (engine(rounds_skipped=None), {"ha_probe_schedule_lag_seconds"}),
    ],
)
def test_probe_engine_figures_that_do_not_add_up_leave_out_their_family(tmp_path, prober,
                                                                       present):
    svc = duty_service(tmp_path)
    try:
        svc.prober = prober  # the figures the service reads from its prober at scrape time
        text = svc.metrics.render(None)[0].decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {n for n in names if n.startswith("ha_probe_")} == present
        assert "ha_master_up" in names  # the rest of the scrape is whole
    finally:
        svc.store.close()


# --- counters another component keeps, written in pieces ---------------------------------------


class _Single:
    def __init__(self, collector: MappingCounter) -> None:
        self.collector = collector

    def collect(self):
        return self.collector.collect()


@pytest.mark.parametrize("openmetrics", [False, True])
def test_a_counter_written_in_pieces_is_what_prometheus_client_writes(openmetrics):
    counts: dict[object, object] = {
        (f"m{i}", 'bad "sum"\n\\' if i % 3 else "é"): (i * 37) % 2_000_000 for i in range(2500)
    }
    counts.update({("big", "x"): 10**7, ("half", "x"): 0.5, ("nan", "x"): math.nan,
                   ("neg", "x"): -1, ("short",): 1, ("int", 3): 1, ("huge", "x"): 10**400})
    errors = ThrottledLog(logging.getLogger(__name__))
    counter = MappingCounter("ha_test_pieces_total", 'Doc \\ with\n"quotes".',
                             ["reason", "master"], lambda: counts, errors)
    generate = om_exposition.generate_latest if openmetrics else text_exposition.generate_latest
    expected = generate(_Single(counter)).decode().removesuffix("# EOF\n")
    assert "".join(counter.chunks(openmetrics)) == expected
    assert len(list(counter.chunks(openmetrics))) > 3


def test_a_master_whose_numbers_cannot_be_copied_loses_only_those_samples(tmp_path, caplog):
    svc = fleet_service(tmp_path, 600)  # two pieces: the odd masters sit in both
    try:
        masters = list(svc.fleet)
        masters[3].bucket_counts = [1, 2]  # only a bug could do this: no histogram for it
        masters[520].result_counts = masters[520].result_counts[:-1]
        masters[521].cpu_percent = "busy"  # type: ignore[assignment]
        text = svc.metrics.render(None)[0].decode()
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        hist = {dict(k[1])["master"] for k in values
                if k[0] == "ha_master_probe_duration_seconds_count"}
        probes = {dict(k[1])["master"] for k in values if k[0] == "ha_master_probes_total"}
        assert masters[3].name not in hist and len(hist) == 599
        assert masters[520].name not in probes and len(probes) == 599
        assert math.isnan(values[("ha_master_cpu_percent", (("master", masters[521].name),))])
        assert values[("ha_master_cpu_percent", (("master", masters[522].name),))] == 12.5 + 522 % 3
        assert values[("ha_master_up", (("master", masters[3].name), ("region", "usa"),
                                        ("role", "standby")))] == 1
        logged = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        assert "ha_master_probe_duration_seconds" in logged and "ha_master_probes_total" in logged
        promtool = require_binary("promtool")
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    finally:
        svc.store.close()
