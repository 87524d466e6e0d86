"""Real Prometheus, Alertmanager and on-call receiver processes for end-to-end tests.

They run with the shipped deploy/ configs, changed by plain text substitution only, so that a
test can prove (with ``yaml_changes``) that nothing but addresses, paths and timings differ from
what an operator deploys. Every process listens on 127.0.0.1, logs to a file in the test's
tmp dir (quoted when a wait fails) and is killed by ``running``'s finally block.

Ports: the receiver and Alertmanager bind port 0 and say which port they got (the receiver's
"listening on" line; Alertmanager's msg="Listening on" address=...), read back from their logs.
Prometheus would say its port too, but its config must name its own address (the self-scrape
job) before it starts: so its port is picked free and, if another process binds it first (the
start fails with "address already in use"), picked again and the start retried.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.processes import Proc, stop_all
from tests.support import closed_port, wait_for
from tests.tools import ROOT

PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RECEIVER_PY = ROOT / "deploy" / "oncall" / "receiver.py"

#: deploy/oncall/receiver.py prints where it listens.
RECEIVER_LISTENING = re.compile(r"on-call receiver listening on (http://\S+)")
#: Prometheus and Alertmanager (exporter-toolkit) log the address they bound.
TOOLKIT_LISTENING = re.compile(r'msg="Listening on" address=(\S+)')
BIND_FAILED = "address already in use"
BIND_ATTEMPTS = 5
#: {"receiver", "alertmanager", "prometheus"}: "127.0.0.1:PORT", as the configs name them.
Addresses = dict[str, str]
#: The text substitutions of a config, given the addresses known when it is written.
Substitutions = Callable[[Addresses], Mapping[str, str]]


def fast_prometheus(exporter_base: str, rules_dir: Path) -> Substitutions:
    """The shipped Prometheus config scraping ``exporter_base`` every second with the rules
    rendered into ``rules_dir``; the other addresses are the stack's own."""
    exporter = exporter_base.removeprefix("http://")

    def subs(addr: Addresses) -> dict[str, str]:
        return {
            "scrape_interval: 15s": "scrape_interval: 1s",
            "evaluation_interval: 15s": "evaluation_interval: 1s",
            "scrape_interval: 5s": "scrape_interval: 1s",
            "../../alert_rules/*.yml": f"{rules_dir}/*.yml",
            "127.0.0.1:9108": exporter,
            "127.0.0.1:9093": addr["alertmanager"],
            "127.0.0.1:9090": addr["prometheus"],
        }

    return subs


def fast_alertmanager(addr: Addresses) -> dict[str, str]:
    """The shipped Alertmanager config delivering to the stack's receiver. Its waits (5 s,
    30 s for info, group_interval 30 s) are timing, not routing: only they are shortened."""
    return {
        "127.0.0.1:9099": addr["receiver"],
        "group_wait: 5s": "group_wait: 1s",
        "group_wait: 30s": "group_wait: 1s",
        "group_interval: 30s": "group_interval: 1s",
    }


def substitute_text(text: str, replacements: Mapping[str, str]) -> str:
    """Replace every occurrence of each key; a key that does not occur is a stale test."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} does not occur in the shipped file any more"
        text = text.replace(old, new)
    return text


def yaml_changes(before: Any, after: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Leaf-by-leaf differences of two YAML documents: {'.a.b[0]': (old, new)}."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(before.keys() | after.keys(), key=str):
            out.update(yaml_changes(before.get(key), after.get(key), f"{path}.{key}"))
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        out = {}
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            out.update(yaml_changes(b, a, f"{path}[{i}]"))
        return out
    return {} if before == after else {path: (before, after)}


@dataclass
class Monitoring:
    """Addresses of the running monitoring stack and the API calls the tests need."""

    http: aiohttp.ClientSession
    prometheus: str
    alertmanager: str
    receiver: str
    prometheus_yml: Path
    alertmanager_yml: Path
    #: as the configs name them: {"receiver", "alertmanager", "prometheus"} -> "127.0.0.1:PORT"
    addresses: Addresses = field(default_factory=dict)
    services: dict[str, Proc] = field(default_factory=dict)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a PromQL error fails the test with Prometheus' own message."""
        async with self.http.get(f"{self.prometheus}/api/v1/query",
                                 params={"query": expr}) as r:
            body = await r.json()
        assert body.get("status") == "success", f"{expr!r}: {body}"
        return body["data"]["result"]

    async def alerts(self) -> list[dict[str, Any]]:
        """Prometheus' pending and firing alerts (GET /api/v1/alerts)."""
        async with self.http.get(f"{self.prometheus}/api/v1/alerts") as r:
            return (await r.json())["data"]["alerts"]

    async def notifications(self) -> list[dict[str, Any]]:
        """Everything the on-call receiver got so far: {path, notification, ...} per POST."""
        async with self.http.get(f"{self.receiver}/received") as r:
            return await r.json()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{s.tail()}" for n, s in self.services.items())


async def _wait_up(http: aiohttp.ClientSession, service: Proc, url: str,
                   timeout: float = 30) -> None:
    """GET url until 200; stop waiting at once (and fail with its log) if the process exits."""
    async def up_or_exited() -> bool:
        if service.popen.poll() is not None:
            return True
        try:
            async with http.get(url) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up_or_exited, timeout, f"{service.name} at {url}", poll=0.1)
    assert service.popen.poll() is None, f"{service.name} exited:\n{service.tail()}"


async def _bound_address(proc: Proc) -> str:
    """HOST:PORT from an exporter-toolkit binary's msg="Listening on" line."""
    return (await proc.wait_output(TOOLKIT_LISTENING, 30, "its listening line")).group(1)


async def _start_on_picked_port(
    start: Callable[[int], Proc], what: str
) -> tuple[Proc, str]:
    """For a binary that must know its port before it starts: pick one, and pick again if
    another process bound it first (the start fails with "address already in use")."""
    for _ in range(BIND_ATTEMPTS):
        proc = start(closed_port())
        try:
            return proc, await _bound_address(proc)
        except AssertionError:
            proc.stop()
            if BIND_FAILED not in proc.output():
                raise
    raise AssertionError(f"{what}: every one of {BIND_ATTEMPTS} picked ports was taken")


@asynccontextmanager
async def running(
    http: aiohttp.ClientSession,
    tmp: Path,
    prometheus_bin: str,
    alertmanager_bin: str,
    prometheus_subs: Substitutions,
    alertmanager_subs: Substitutions,
) -> AsyncIterator[Monitoring]:
    """Receiver, Alertmanager and Prometheus (in that order: each is ready before the next one
    may talk to it), on the shipped configs with text substitutions. Each substitution function
    gets the addresses bound so far: Alertmanager's config is written knowing the receiver's,
    Prometheus' knowing all three (its own included)."""
    addr: Addresses = {}
    procs: list[Proc] = []
    prom_yml, am_yml = tmp / "prometheus.yml", tmp / "alertmanager.yml"
    try:
        receiver = Proc([sys.executable, str(RECEIVER_PY), "--host", "127.0.0.1", "--port", "0"],
                        tmp / "receiver.log", listening=RECEIVER_LISTENING)
        procs.append(receiver)
        addr["receiver"] = (await receiver.listening()).removeprefix("http://")
        await _wait_up(http, receiver, f"http://{addr['receiver']}/healthz")

        am_yml.write_text(substitute_text(ALERTMANAGER_YML.read_text(), alertmanager_subs(addr)))
        alertmanager = Proc([
            alertmanager_bin, f"--config.file={am_yml}", f"--storage.path={tmp / 'am-data'}",
            "--web.listen-address=127.0.0.1:0",
            "--cluster.listen-address=",  # empty: no gossip port, no peers
        ], tmp / "alertmanager.log")
        procs.append(alertmanager)
        addr["alertmanager"] = await _bound_address(alertmanager)
        assert not addr["alertmanager"].endswith(":0"), "this Alertmanager does not say its port"
        await _wait_up(http, alertmanager, f"http://{addr['alertmanager']}/-/ready")

        def start_prometheus(port: int) -> Proc:
            addr["prometheus"] = f"127.0.0.1:{port}"
            prom_yml.write_text(
                substitute_text(PROMETHEUS_YML.read_text(), prometheus_subs(addr)))
            proc = Proc([
                prometheus_bin, f"--config.file={prom_yml}",
                f"--storage.tsdb.path={tmp / 'prom-data'}",
                f"--web.listen-address={addr['prometheus']}",
            ], tmp / "prometheus.log")
            procs.append(proc)
            return proc

        prometheus, bound = await _start_on_picked_port(start_prometheus, "prometheus")
        assert bound == addr["prometheus"], (bound, addr)
        await _wait_up(http, prometheus, f"http://{addr['prometheus']}/-/ready")
        yield Monitoring(
            http,
            prometheus=f"http://{addr['prometheus']}",
            alertmanager=f"http://{addr['alertmanager']}",
            receiver=f"http://{addr['receiver']}",
            prometheus_yml=prom_yml,
            alertmanager_yml=am_yml,
            addresses=dict(addr),
            services={"receiver": receiver, "alertmanager": alertmanager,
                      "prometheus": prometheus},
        )
    finally:
        stop_all(procs[::-1])
