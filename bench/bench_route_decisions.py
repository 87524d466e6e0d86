"""In-process routing decision latency per strategy, at 10 and 10,000 masters.

Run: ``python bench/bench_route_decisions.py [--decisions N]``. Each decision is timed on its
own with time.perf_counter_ns (so the figures include about 0.1 µs of timer overhead); the
pool is built before timing starts, since pools are rebuilt only when something changes.
The fleet: 4 regions, 5 priority levels, weights 1..3, queue lengths spread over 0..199
(none saturated), one master in ten degraded; geo requests name a region, consistent_hash
requests carry a key.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.config import STRATEGIES, BalancingConfig, MasterConfig
from exporter.fleet import State
from exporter.routing.router import Router

REGIONS = ("uae", "usa", "eu", "apac")
TARGET_P99_US = 20.0


def build(n: int, strategy: str) -> Router:
    masters = [
        MasterConfig(
            name=f"master-{i}",
            url=f"http://10.0.{i // 250}.{i % 250}:9200",
            region=REGIONS[i % len(REGIONS)],
            priority=i % 5,
            weight=1 + i % 3,
        )
        for i in range(n)
    ]
    balancing = BalancingConfig(strategy=strategy, region_fallback=["usa", "eu"])
    router = Router(balancing, masters, rng=random.Random(1))
    rng = random.Random(2)
    for i, m in enumerate(masters):
        router.set_load(m.name, rng.randrange(200))
        if i % 10 == 9:
            router.set_state(m.name, State.DEGRADED)
    return router


def measure(router: Router, strategy: str, decisions: int) -> tuple[float, float, float]:
    rng = random.Random(3)
    keys = [f"session-{rng.getrandbits(40)}" for _ in range(decisions)]
    regions = [REGIONS[i % len(REGIONS)] for i in range(decisions)]
    use_key = strategy == "consistent_hash"
    use_region = strategy == "geo"
    route = router.route
    clock = time.perf_counter_ns
    for i in range(1000):  # warm-up: builds the pool (and the ring) outside the timing
        route(keys[i] if use_key else None, regions[i] if use_region else None)
    samples = [0] * decisions
    gc.collect()
    gc.disable()
    try:
        for i in range(decisions):
            key = keys[i] if use_key else None
            region = regions[i] if use_region else None
            t0 = clock()
            route(key, region)
            samples[i] = clock() - t0
    finally:
        gc.enable()
    samples.sort()
    return (
        samples[decisions // 2] / 1000,
        samples[decisions * 99 // 100] / 1000,
        samples[-1] / 1000,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 10_000])
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {args.decisions} decisions per row")
    print(f"{'strategy':<16} {'masters':>8} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>9}  target")
    failed = False
    for n in args.sizes:
        for strategy in STRATEGIES:
            router = build(n, strategy)
            p50, p99, worst = measure(router, strategy, args.decisions)
            ok = p99 < TARGET_P99_US
            failed |= not ok
            verdict = "ok" if ok else f"MISS (p99 >= {TARGET_P99_US:g} µs)"
            print(f"{strategy:<16} {n:>8} {p50:>8.2f} {p99:>8.2f} {worst:>9.1f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
