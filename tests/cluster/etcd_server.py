"""A real etcd (Debian's etcd-server) for tests: one member, listening on unix sockets.

etcd cannot listen on TCP port 0 (its JSON gateway dials the literal listen URL), so it
listens on ``c.sock:1`` (clients) and ``p.sock:2`` (peers), names it resolves in its working
directory: nothing to pick, nothing to race. The client endpoint is that socket's absolute
path, which must stay under the 108 bytes of a unix socket address: when the test's directory
is too deep, sockets go to a short directory under /tmp (removed at the end).

``start()`` waits until the gateway answers a range request (failing at once, with the log,
if etcd exits); ``restart()`` brings it back on the same data and socket, so a test can take
etcd away and see its clients recover. The ``etcd_server`` fixture stops it in any case.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import wait_for
from tests.tools import require_binary

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLIENT_SOCKET = "c.sock:1"
PEER_SOCKET = "p.sock:2"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes, NUL included; keep a margin


class EtcdServer:
    """One etcd member: data in ``root/etcd-data``, output in ``root/etcd.log`` (appended
    across restarts), sockets in ``root`` or, if that path is too long, a short temp dir."""

    def __init__(self, root: Path, binary: str = "etcd") -> None:
        self.root = root
        self.binary = binary
        self.data = root / "etcd-data"
        self.log = root / "etcd.log"
        self._own_dir: Path | None = None
        if len(str(root.resolve() / CLIENT_SOCKET)) > MAX_SOCKET_PATH:
            self._own_dir = Path(tempfile.mkdtemp(prefix="etcd", dir="/tmp"))
        self.dir = (self._own_dir or root).resolve()
        self.socket = self.dir / CLIENT_SOCKET
        self.endpoint = f"unix://{self.socket}"
        self.popen: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        client, peer = f"unix://{CLIENT_SOCKET}", f"unix://{PEER_SOCKET}"
        return [
            self.binary, "--name", "t", "--data-dir", str(self.data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t={peer}",
            # A short election timeout makes etcd's minimum lease TTL 1 s (1.5 x election).
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def start(self, timeout: float = START_TIMEOUT) -> EtcdServer:
        """Start etcd and wait until its gateway answers; on failure it is stopped."""
        assert not self.running, "etcd is already running"
        for name in (CLIENT_SOCKET, PEER_SOCKET):  # left behind by a kill: etcd 3.4 would
            (self.dir / name).unlink(missing_ok=True)  # fail with "address already in use"
        with self.log.open("ab") as out:
            offset = out.tell()
            self.popen = subprocess.Popen(self.argv(), cwd=self.dir, stdout=out,
                                          stderr=subprocess.STDOUT)
        try:
            await self._wait_serving(timeout, offset)
        except BaseException:
            self.kill()
            raise
        return self

    async def _wait_serving(self, timeout: float, offset: int) -> None:
        exited = "exited"

        async def serving() -> bool | str:
            if not self.running:
                return exited
            try:
                await self.post("/v3/kv/range", {"key": "AA=="}, timeout=1.0)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return False
            return True

        found = await wait_for(serving, timeout, f"etcd serving on {self.socket}", poll=0.05)
        if found is exited:
            assert self.popen is not None
            raise AssertionError(f"etcd exited with {self.popen.returncode} before serving:\n"
                                 f"{self.output(offset)[-3000:]}")

    def output(self, offset: int = 0) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    async def post(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
        """POST to etcd's gateway directly (what the client under test does not offer, e.g.
        ``/v3/kv/compaction``); the JSON answer, or ClientResponseError for a non-200."""
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as http, http.post(f"http://localhost{path}", json=body) as resp:
            resp.raise_for_status()
            return await resp.json()

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM (etcd shuts down cleanly and removes its sockets) and reap; SIGKILL if
        it takes longer than STOP_TIMEOUT. Safe when not running, or paused."""
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a paused etcd handles SIGTERM only once resumed
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL and reap: a crash (the socket file stays behind, refusing connections)."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: etcd hangs, connections are accepted by the kernel but never answered."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    async def restart(self, timeout: float = START_TIMEOUT) -> EtcdServer:
        """Stopped if running, then started again on the same data dir and socket."""
        self.stop()
        return await self.start(timeout)

    def cleanup(self) -> None:
        """Kill etcd if it still runs; remove the short socket dir, if one was made."""
        self.kill()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


@pytest.fixture
async def etcd_server(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    """A started etcd in tmp_path, killed and cleaned up at the end of the test in any case."""
    server = EtcdServer(tmp_path, require_binary("etcd"))
    try:
        await server.start()
        yield server
    finally:
        server.cleanup()
