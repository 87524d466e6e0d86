"""Summarise py-spy raw (folded) stacks: where the samples are, as shares.

Run: python -m bench.pyspy_top FILE [FILE ...] [--top 15]

For the files ``bench_process --py-spy DIR`` writes (``py-spy record -f raw``). Four views: per
part of the exporter (``AREAS``), per event-loop callback (the frame right under ``Runner.run``:
what the loop was running), per function including its callees (each function counted once per
stack), and per leaf (self time).
Line numbers are dropped, so a function's lines add up. py-spy ``--nonblocking`` reads a running
process, so some stacks come torn: a coroutine's frames without the loop's beneath them; those are
listed under their outermost frame as "(partial stack)".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<name>.*?) \((?P<where>.*?)(?::\d+)?\)$")
LOOP = "Runner.run"
#: The exporter's parts, each by a few marks of its frames; a stack goes to the first part one
#: of its frames marks (aiohttp's client serves only the checkpoints' calls in these runs).
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/metrics scrapes (HTTP server included)",
     ("exporter/metrics/", "web/core.py", "aiohttp/web_")),
    ("checkpoints (GET /state over aiohttp, store)",
     ("failover/checkpoints.py", "failover/protocol.py", "aiohttp/client", "aiohttp/connector",
      "checkpoint")),
    ("failover periodic round (reconcile)", ("FailoverManager._periodic", "failover/reality.py")),
    ("routing rebalance loop", ("_rebalance_loop",)),
    ("probe path (engine, classify, on_probe)",
     ("exporter/probing/", "Service.on_probe", "json/", "exporter/fleet/")),
)


def _frame(text: str) -> str:
    """``Conn.data_received (exporter/probing/wire.py:172)`` -> ``Conn.data_received
    (exporter/probing/wire.py)``."""
    m = _LINE.match(text)
    return f"{m['name']} ({m['where']})" if m else text


def area(frames: list[str]) -> str:
    for name, marks in AREAS:
        if any(mark in frame for frame in frames for mark in marks):
            return name
    if frames and frames[-1].startswith(LOOP):
        return "the loop itself (native: epoll, sockets, callbacks)"
    return "other"


def summarise(paths: list[Path]) -> tuple[int, Counter[str], Counter[str], Counter[str],
                                           Counter[str]]:
    total = 0
    areas: Counter[str] = Counter()
    callbacks: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame(f) for f in stack.split(";")]
            total += n
            areas[area(frames)] += n
            names = [f.split(" (", 1)[0] for f in frames]
            if LOOP not in names:  # torn (a coroutine's frames read without the rest)
                callbacks[f"(partial stack) {frames[0]}"] += n
            elif (below := names.index(LOOP) + 1) < len(frames):
                callbacks[frames[below]] += n
            else:
                callbacks["(in the loop itself: native, or idle)"] += n
            for f in set(frames):
                inclusive[f] += n
            leaves[frames[-1]] += n
    return total, areas, callbacks, inclusive, leaves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    total, areas, callbacks, inclusive, leaves = summarise(args.files)
    print(f"{total} samples")
    views = (("per part", areas), ("per loop callback", callbacks), ("inclusive", inclusive),
             ("self (leaf)", leaves))
    for title, counts in views:
        print(f"\n{title}:")
        for frame, n in counts.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
