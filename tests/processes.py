"""Real processes for end-to-end tests: `ha-exporter master` and `ha-exporter run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from tests.support import free_port, wait_ready

TOKEN = "e2e-token"


class Proc:
    """A child process whose output goes to a file (readable after a failure)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.log = args, log
        self._out = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.kill(signal.SIGKILL)
        try:
            self.popen.wait(5)
        finally:
            self._out.close()


def start_master(
    tmp: Path,
    name: str,
    port: int,
    region: str = "uae",
    role: str = "active",
    drain_rate: float = 50.0,
) -> Proc:
    return Proc(
        [
            "master",
            "--name",
            name,
            "--port",
            str(port),
            "--region",
            region,
            "--role",
            role,
            "--drain-rate",
            str(drain_rate),
        ],
        tmp / f"{name}.log",
    )


def write_config(tmp: Path, masters: list[dict], **sections: dict) -> Path:
    cfg = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "state_path": str(tmp / "state.db"),
        "probe": {
            "interval": "500ms",
            "timeout": "300ms",
            "failure_threshold": 3,
            "recovery_threshold": 2,
            "jitter": "10%",
        },
        "masters": masters,
        "api": {"token_env": "HA_TEST_TOKEN"},
        **sections,
    }
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_exporter(tmp: Path, config: Path, *extra: str) -> tuple[Proc, str]:
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    proc = Proc(
        ["run", "--config", str(config), *extra], tmp / "exporter.log", env={"HA_TEST_TOKEN": TOKEN}
    )
    return proc, f"http://127.0.0.1:{port}"


class Stack:
    """Master processes and one exporter process on 127.0.0.1, stopped in any case."""

    def __init__(self, tmp, specs: list[tuple[str, str, str, int]], **sections: dict) -> None:
        self.tmp, self.specs, self.sections = tmp, specs, sections
        self.ports = {name: free_port() for name, *_ in specs}
        self.urls = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.masters = {
            n: start_master(tmp, n, self.ports[n], region, role) for n, region, role, _ in specs
        }
        self.config = write_config(
            tmp,
            [
                {"name": n, "url": self.urls[n], "region": r, "role": role, "priority": p}
                for n, r, role, p in specs
            ],
            **sections,
        )
        self.exporter, self.base = start_exporter(tmp, self.config)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        await wait_ready(http, self.base)

    def stop(self) -> None:
        self.exporter.stop()
        for m in self.masters.values():
            m.stop()
