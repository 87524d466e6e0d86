"""Detection at the default probe settings, with real processes: `ha-exporter run` with a
config that has no ``probe:`` section, in front of `ha-exporter master` processes; each
master killed (SIGKILL) must read ``failed`` within 5 s of the kill.

The bound at the defaults (1 s interval, 10% jitter, 750 ms timeout, threshold 3) is
threshold x interval x (1 + jitter) + timeout + two scheduler ticks = 4.07 s when the last
probe times out; a killed process refuses connections at once, so about 3.3 s. Three masters
are killed one after the other, each at a different point of its probe cycle; the fourth stays
up and must stay healthy.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import yaml

from exporter.config import ProbeConfig, load_config
from tests.processes import Processes
from tests.support import config_dict, get_json, master_entry, wait_for, wait_ready

GOAL = 5.0
VICTIMS = ("m1", "m2", "m3")


async def state(http, base: str, name: str) -> str:
    return (await get_json(http, f"{base}/api/v1/masters/{name}"))["state"]


async def test_a_killed_master_is_failed_within_5_s_at_the_defaults(tmp_path, processes: Processes,
                                                                    http):
    names = [*VICTIMS, "survivor"]
    masters = {name: await processes.master(name) for name in names}
    cfg = config_dict(
        tmp_path,
        [master_entry(n, masters[n].url or "", priority=i + 1) for i, n in enumerate(names)],
        failover={"enabled": False},  # detection is under test: the state stays failed
    )
    del cfg["probe"]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert load_config(path).probe == ProbeConfig()  # every probe setting at its default
    exporter = await processes.exporter(path)
    base = await exporter.listening()
    await wait_ready(http, base)

    async def all_healthy() -> bool:
        return all([await state(http, base, n) == "healthy" for n in names])

    await wait_for(all_healthy, 15, "every master healthy")
    rng = random.Random()
    took: dict[str, float] = {}
    for name in VICTIMS:
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # another point of the probe cycle each time
        masters[name].kill(signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + GOAL

        async def failed(name: str = name) -> bool:
            return await state(http, base, name) == "failed"

        await wait_for(failed, deadline - time.monotonic(), f"{name} failed", poll=0.02)
        took[name] = time.monotonic() - killed
        assert took[name] < GOAL, took
    print(f"\nkill -> failed at the default probe settings: "
          f"{', '.join(f'{n} {s:.2f}s' for n, s in took.items())}")
    assert await state(http, base, "survivor") == "healthy"
