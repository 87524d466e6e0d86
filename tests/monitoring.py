"""Real Prometheus, Alertmanager and on-call receiver processes for end-to-end tests.

They run with the shipped deploy/ configs, changed by plain text substitution only, so that a
test can prove (with ``yaml_changes``) that nothing but addresses, paths and timings differ from
what an operator deploys. Every process listens on 127.0.0.1, logs to a file in the test's
tmp dir (quoted when a wait fails) and is killed by ``running``'s finally block.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import free_port, wait_for
from tests.tools import ROOT

PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RECEIVER_PY = ROOT / "deploy" / "oncall" / "receiver.py"


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


class Service:
    """One child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.log = name, log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(5)
        finally:
            self._out.close()


@dataclass
class Monitoring:
    """Addresses of the running monitoring stack and the API calls the tests need."""

    http: aiohttp.ClientSession
    prometheus: str
    alertmanager: str
    receiver: str
    prometheus_yml: Path
    alertmanager_yml: Path
    services: dict[str, Service] = field(default_factory=dict)

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
        return "\n".join(f"--- {n} ---\n{s.output()}" for n, s in self.services.items())


async def _wait_up(http: aiohttp.ClientSession, service: Service, url: str,
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
    assert service.popen.poll() is None, f"{service.name} exited:\n{service.output()}"


@asynccontextmanager
async def running(
    http: aiohttp.ClientSession,
    tmp: Path,
    prometheus_bin: str,
    alertmanager_bin: str,
    prometheus_subs: Mapping[str, str],
    alertmanager_subs: Mapping[str, str],
    ports: Mapping[str, int] | None = None,
) -> AsyncIterator[Monitoring]:
    """Receiver, Alertmanager and Prometheus (in that order: each is ready before the next one
    may talk to it), on the shipped configs with the given text substitutions.

    ``ports`` ({"prometheus", "alertmanager", "receiver"}) lets the caller build substitutions
    that name them; missing ones are picked free here.
    """
    port = {n: (ports or {}).get(n) or free_port()
            for n in ("prometheus", "alertmanager", "receiver")}
    prom_yml = tmp / "prometheus.yml"
    prom_yml.write_text(substitute_text(PROMETHEUS_YML.read_text(), prometheus_subs))
    am_yml = tmp / "alertmanager.yml"
    am_yml.write_text(substitute_text(ALERTMANAGER_YML.read_text(), alertmanager_subs))
    mon = Monitoring(
        http,
        prometheus=f"http://127.0.0.1:{port['prometheus']}",
        alertmanager=f"http://127.0.0.1:{port['alertmanager']}",
        receiver=f"http://127.0.0.1:{port['receiver']}",
        prometheus_yml=prom_yml,
        alertmanager_yml=am_yml,
    )
    try:
        mon.services["receiver"] = Service("receiver", [
            sys.executable, str(RECEIVER_PY), "--host", "127.0.0.1",
            "--port", str(port["receiver"]),
        ], tmp / "receiver.log")
        await _wait_up(http, mon.services["receiver"], f"{mon.receiver}/healthz")
        mon.services["alertmanager"] = Service("alertmanager", [
            alertmanager_bin, f"--config.file={am_yml}", f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port['alertmanager']}",
            "--cluster.listen-address=",  # empty: no gossip port, no peers
        ], tmp / "alertmanager.log")
        await _wait_up(http, mon.services["alertmanager"], f"{mon.alertmanager}/-/ready")
        mon.services["prometheus"] = Service("prometheus", [
            prometheus_bin, f"--config.file={prom_yml}",
            f"--storage.tsdb.path={tmp / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port['prometheus']}",
        ], tmp / "prometheus.log")
        await _wait_up(http, mon.services["prometheus"], f"{mon.prometheus}/-/ready")
        yield mon
    finally:
        for service in reversed(mon.services.values()):
            service.stop()
