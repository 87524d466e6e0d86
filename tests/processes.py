"""The test harness, child-process half: `ha-exporter master` and `ha-exporter run` as real
processes, and any other program the end-to-end tests start.

Every child binds port 0 and says where it listens; the harness reads that line from the
child's output (with a deadline, failing at once with the output if the child exits first).
Masters start first, so that the exporter's config names their real URLs. Output goes to a
file in the test's tmp dir (tests/conftest.py prints the tails of a failed test's logs), and
everything is stopped in any case: ``Stack``/``Processes`` by the ``stack``/``processes``
fixtures or ``async with``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp

from tests.support import (
    TOKEN,
    TOKEN_ENV,
    master_entry,
    wait_for,
    wait_ready,
    write_config,
)

#: `ha-exporter master` prints this one line on stdout once it listens.
MASTER_LISTENING = re.compile(r"^listening on (http://\S+)$", re.M)
#: The line `ha-exporter run` logs once it listens (text or JSON log format alike).
EXPORTER_LISTENING = re.compile(r"ha-exporter listening on (http://[^\s\"]+) with \d+ masters")
#: A master of a stack: (name, region, role, priority).
Spec = tuple[str, str, str, int]
#: The ``stack`` fixture: ``await stack(specs, drain=..., **sections)`` -> a started Stack.
StartStack = Callable[..., Awaitable["Stack"]]

STOP_TIMEOUT = 5.0
START_TIMEOUT = 30.0


def exporter_cli(*args: str) -> list[str]:
    """argv of `ha-exporter ARGS...` run by this interpreter (the project's virtualenv)."""
    return [sys.executable, "-m", "exporter.cli", *args]


class Proc:
    """A child process whose stdout and stderr go to ``log`` (appended: a restarted process
    writes after its predecessor; ``output()`` is this one's part only).

    ``listening`` is the pattern of the line that tells where it listens (group 1: base URL);
    ``await proc.listening()`` waits for it and sets ``proc.url``."""

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        listening: re.Pattern[str] | None = None,
    ) -> None:
        self.argv, self.log, self.pattern = list(argv), log, listening
        self.url: str | None = None
        self.out = log.open("ab")
        self.offset = self.out.tell()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def name(self) -> str:
        return self.log.stem

    @property
    def port(self) -> int:
        assert self.url, f"{self.name}: port unknown before listening()"
        port = urlsplit(self.url).port
        assert port, self.url
        return port

    def output(self) -> str:
        with self.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    async def wait_output(
        self, pattern: str | re.Pattern[str], timeout: float, what: str
    ) -> re.Match[str]:
        """The first match of ``pattern`` in this process's output, once it appears; fails at
        the deadline, or as soon as the process exits without printing it, quoting the log."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        exited = object()

        def seen() -> re.Match[str] | object | None:
            gone = self.popen.poll() is not None  # before reading: its last words are in
            match = regex.search(self.output())
            return match if match else exited if gone else None

        try:
            found = await wait_for(seen, timeout, f"{what} from {self.name}", poll=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.log} ---\n{self.tail()}") from None
        if not isinstance(found, re.Match):
            raise AssertionError(
                f"{self.name} exited with {self.popen.returncode} before {what}:\n"
                f"--- {self.log} ---\n{self.tail()}"
            )
        return found

    async def listening(self, timeout: float = START_TIMEOUT) -> str:
        """The base URL it listens on, read from its output (port 0 resolved)."""
        if self.url is None:
            assert self.pattern is not None, f"{self.name}: no listening line to wait for"
            match = await self.wait_output(self.pattern, timeout, "the listening line")
            self.url = match.group(1)
        return self.url

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """SIGKILL (if still running), reap, close the log; safe to call again."""
        self.kill(signal.SIGKILL)
        try:
            self.popen.wait(STOP_TIMEOUT)
        finally:
            self.out.close()


def master_proc(
    tmp: Path,
    name: str,
    region: str = "uae",
    role: str = "active",
    *,
    drain_rate: float = 50.0,
    port: int = 0,
) -> Proc:
    """`ha-exporter master` started (not waited for); log ``tmp/NAME.log``."""
    argv = exporter_cli(
        "master", "--name", name, "--port", str(port), "--region", region, "--role", role,
        "--drain-rate", str(drain_rate),
    )
    return Proc(argv, tmp / f"{name}.log", listening=MASTER_LISTENING)


def exporter_proc(
    tmp: Path,
    config: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    log_format: str = "text",
) -> Proc:
    """`ha-exporter run --config CONFIG EXTRA...` started (not waited for), with the test token
    in $HA_TEST_TOKEN unless ``env`` says otherwise; log ``tmp/exporter.log``."""
    argv = exporter_cli("--log-format", log_format, "run", "--config", str(config), *extra)
    return Proc(
        argv, tmp / "exporter.log", env={TOKEN_ENV: TOKEN, **(env or {})},
        listening=EXPORTER_LISTENING,
    )


async def started(proc: Proc, timeout: float = START_TIMEOUT) -> Proc:
    """``proc`` once it listens; stopped (and the failure raised) if it never does."""
    try:
        await proc.listening(timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


async def spawn_master(
    tmp: Path,
    name: str,
    region: str = "uae",
    role: str = "active",
    *,
    drain_rate: float = 50.0,
    port: int = 0,
) -> Proc:
    """A listening `ha-exporter master` (port 0 unless told), ``url`` set."""
    return await started(master_proc(tmp, name, region, role, drain_rate=drain_rate, port=port))


async def spawn_exporter(
    tmp: Path,
    config: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    log_format: str = "text",
) -> Proc:
    """A listening `ha-exporter run` (its config says port 0), ``url`` set; not yet ready."""
    return await started(exporter_proc(tmp, config, *extra, env=env, log_format=log_format))


class Processes:
    """The child processes of one test; ``stop()`` (the ``processes`` fixture) ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def start(self, argv: Sequence[str], name: str, *,
              env: Mapping[str, str] | None = None,
              listening: re.Pattern[str] | None = None) -> Proc:
        """Any program, its output in ``tmp/NAME.log``."""
        return self.add(Proc(argv, self.tmp / f"{name}.log", env=env, listening=listening))

    async def master(self, name: str, region: str = "uae", role: str = "active", *,
                     drain_rate: float = 50.0, port: int = 0) -> Proc:
        proc = self.add(master_proc(self.tmp, name, region, role, drain_rate=drain_rate,
                                    port=port))
        return await started(proc)

    async def exporter(self, config: Path, *extra: str, env: Mapping[str, str] | None = None,
                       log_format: str = "text") -> Proc:
        proc = self.add(exporter_proc(self.tmp, config, *extra, env=env, log_format=log_format))
        return await started(proc)

    def stop(self) -> None:
        stop_all(self.procs)


def stop_all(procs: Sequence[Proc | None]) -> None:
    """Stop every one, even if stopping one fails; then raise the first failure."""
    errors: list[BaseException] = []
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.stop()
        except BaseException as exc:  # still stop the others
            errors.append(exc)
    if errors:
        raise errors[0]


class Stack:
    """`ha-exporter master` processes and one `ha-exporter run` on 127.0.0.1.

    ``await stack.start()`` (or ``async with``, or the ``stack`` fixture): the masters start
    together on port 0, their real URLs go into the config (tests.support.write_config:
    ``sections`` replace its sections, e.g. ``failover={...}``), then the exporter starts on
    port 0. After that: ``masters``/``urls``/``ports`` by name, ``config``, ``exporter``,
    ``base`` (the exporter's URL). ``drain`` sets a master's drain rate (default 50/s).
    ``stop()`` ends everything started, whatever happened.
    """

    #: class-level defaults until start() sets them
    exporter: Proc | None = None
    base: str = ""

    def __init__(
        self,
        tmp: Path,
        specs: Sequence[Spec],
        *,
        drain: Mapping[str, float] | None = None,
        log_format: str = "text",
        **sections: object,
    ) -> None:
        self.tmp, self.specs, self.sections = tmp, list(specs), sections
        self.drain = dict(drain or {})
        self.log_format = log_format
        self.masters: dict[str, Proc] = {}
        self.urls: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.config = tmp / "config.yml"

    def spec(self, name: str) -> Spec:
        return next(s for s in self.specs if s[0] == name)

    async def start(self, timeout: float = START_TIMEOUT) -> Stack:
        for name, region, role, _ in self.specs:
            self.masters[name] = master_proc(
                self.tmp, name, region, role, drain_rate=self.drain.get(name, 50.0)
            )
        urls = await asyncio.gather(*(m.listening(timeout) for m in self.masters.values()))
        self.urls = dict(zip(self.masters, urls, strict=True))
        self.ports = {name: proc.port for name, proc in self.masters.items()}
        self.config = write_config(
            self.tmp,
            [master_entry(n, self.urls[n], region, role, prio)
             for n, region, role, prio in self.specs],
            **self.sections,
        )
        self.exporter = exporter_proc(self.tmp, self.config, log_format=self.log_format)
        self.base = await self.exporter.listening(timeout)
        return self

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 15) -> None:
        """Started (if not yet) and the current exporter ready (GET /readyz is 200)."""
        if self.exporter is None:
            await self.start()
        assert self.exporter is not None
        self.base = await self.exporter.listening()  # a restarted exporter has a new port
        await wait_ready(http, self.base, timeout)

    async def restart_master(self, name: str) -> Proc:
        """Stop the master and start it again on the port it had: the exporter's config names
        that URL. (The old process bound it and is gone; should another process have taken the
        port meanwhile, the start fails and says so.)"""
        self.masters[name].stop()
        _, region, role, _ = self.spec(name)
        self.masters[name] = await spawn_master(
            self.tmp, name, region, role, drain_rate=self.drain.get(name, 50.0),
            port=self.ports[name],
        )
        return self.masters[name]

    async def restart_exporter(self, *extra: str) -> Proc:
        """Stop the exporter (SIGKILL if it still runs) and start another on the same config
        and state; it binds a new port, and ``base`` follows it."""
        if self.exporter is not None:
            self.exporter.stop()
        self.exporter = await spawn_exporter(
            self.tmp, self.config, *extra, log_format=self.log_format
        )
        self.base = await self.exporter.listening()
        return self.exporter

    def logs(self, tail: int = 3000) -> str:
        procs = [*self.masters.values(), *([self.exporter] if self.exporter else [])]
        return "\n".join(f"--- {p.log.name} ---\n{p.tail(tail)}" for p in procs)

    def stop(self) -> None:
        stop_all([self.exporter, *self.masters.values()])

    async def __aenter__(self) -> Stack:
        try:
            return await self.start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
