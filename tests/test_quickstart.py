"""The README's Quick start, run as a script: its shell blocks, read from README.md (so this test
breaks when the README changes), run by bash exactly as written, in a fresh directory whose
``.venv`` is this checkout's virtualenv, twice in that same directory.

The Quick start names fixed ports (9201-9203, 9108) because it is written for people. So that
they neither clash with anything else on the machine nor fail at random, both runs happen in a
private network namespace (``unshare -rn``): the ports there are always free, and nothing
outside can reach the processes. Where no namespace can be made, the test checks that the four
ports are free first and fails naming the busy ones.

Between the blocks the test's own checker (``CHECKER``) reads every master's own ``/health``,
the exporter's ``/metrics`` and ``/api/v1/masters``:

* run 1, before the last block (stop): master-c serves master-a's and master-b's duties, the
  state the second run starts from;
* run 2, after the first block (started): the fresh master-a and master-b serve their own
  duties, master-c nothing, the exporter agrees (roles), and ``ha_duty_served`` is 1 for each;
* run 2, before the last block: every duty served exactly once, ``ha_duty_served`` 1 each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PORTS = (9201, 9202, 9203, 9108)
RUN_TIMEOUT = 300.0

CHECKER = r'''
import json, re, sys, time, urllib.request

MASTERS = {"master-a": 9201, "master-b": 9202, "master-c": 9203}
DUTIES = ("master-a", "master-b")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return None


def look():
    holders = {duty: [] for duty in DUTIES}
    for name, port in MASTERS.items():
        body = get(f"http://127.0.0.1:{port}/health")
        health = json.loads(body) if body else {}
        if health.get("active") is True:
            for duty in health.get("duties") or []:
                holders.setdefault(duty, []).append(name)
    text = get("http://127.0.0.1:9108/metrics") or ""
    served = {d: float(v) for d, v in re.findall(r'^ha_duty_served\{duty="([^"]+)"\} (\S+)$',
                                                 text, re.M)}
    body = get("http://127.0.0.1:9108/api/v1/masters")
    roles = {m["name"]: m["role"] for m in json.loads(body)["masters"]} if body else {}
    return {"holders": holders, "served": served, "roles": roles}


def done(mode, seen):
    once = all(len(seen["holders"][d]) == 1 for d in DUTIES)
    metric = all(seen["served"].get(d) == 1.0 for d in DUTIES)
    if mode == "taken-over":
        return seen["holders"] == {"master-a": ["master-c"], "master-b": ["master-c"]}
    if mode == "started":
        return (seen["holders"] == {"master-a": ["master-a"], "master-b": ["master-b"]}
                and metric and seen["roles"] == {"master-a": "active", "master-b": "active",
                                                 "master-c": "standby"})
    return once and metric


mode, out = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
seen = look()
while not done(mode, seen) and time.monotonic() - t0 < 20:
    time.sleep(0.1)
    seen = look()
with open(out, "a") as f:
    f.write(json.dumps({"mode": mode, "ok": done(mode, seen),
                        "seconds": round(time.monotonic() - t0, 2), **seen}) + "\n")
'''


def quickstart_blocks() -> list[str]:
    """The ```sh blocks of the README's Quick start section, in order."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Quick start[^\n]*\n(.*?)^## ", readme, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```sh\n(.*?)^```", match.group(1), re.S | re.M)
    assert len(blocks) >= 3, f"expected start, try and stop blocks, found {len(blocks)}"
    assert "ha-exporter run" in blocks[0], "the first block starts the exporter"
    assert re.search(r"^kill .*; wait$", blocks[-1], re.M), "the last block stops everything"
    return blocks


def script(blocks: list[str]) -> str:
    """Both runs as one bash script: run 1, then run 2 in the same directory, each a shell of
    its own (as a person would open a new terminal), with the checker between blocks."""
    check = '"$QS_PY" "$QS_CHECKER" {} "$QS_RESULTS"\n'
    run1 = "".join(blocks[:-1]) + check.format("taken-over") + blocks[-1]
    run2 = (blocks[0] + check.format("started") + "".join(blocks[1:-1])
            + check.format("final") + blocks[-1])
    return (f"bash <<'RUN1'\n{run1}RUN1\n"
            "mkdir -p run-1 && cp ./*.log run-1/\n"
            f"bash <<'RUN2'\n{run2}RUN2\n")


def namespace_available() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def busy_ports() -> list[int]:
    busy = []
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def test_the_quick_start_works_as_written_twice_in_one_directory(tmp_path: Path) -> None:
    for tool in ("bash", "curl", "openssl"):
        assert shutil.which(tool), f"the Quick start needs {tool}, which is not installed"
    work = tmp_path / "quickstart"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "check.py").write_text(CHECKER)
    (tmp_path / "run.sh").write_text(script(quickstart_blocks()))
    results = tmp_path / "results.jsonl"
    env = {**os.environ, "QS_PY": sys.executable, "QS_CHECKER": str(tmp_path / "check.py"),
           "QS_RESULTS": str(results)}
    env.pop("HA_EXPORTER_TOKEN", None)
    argv = ["bash", str(tmp_path / "run.sh")]
    if namespace_available():
        argv = ["unshare", "-rn", "bash", "-c", 'ip link set lo up && exec "$@"', "-", *argv]
    else:
        busy = busy_ports()
        assert not busy, (f"the Quick start needs ports {PORTS} and no network namespace can "
                          f"be made here; busy: {busy}")
    with (tmp_path / "quickstart.log").open("wb") as out:
        proc = subprocess.run(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"the Quick start script exited with {proc.returncode}"
    seen: dict[str, dict[str, Any]] = {}
    for line in results.read_text().splitlines():
        entry = json.loads(line)
        seen[entry["mode"]] = entry
    assert list(seen) == ["taken-over", "started", "final"], seen
    # run 1 leaves a state file saying master-c holds both duties
    assert seen["taken-over"]["ok"], seen["taken-over"]
    # run 2: the fresh masters serve their own duties and nobody fences them
    started = seen["started"]
    assert started["ok"], started
    print(f"second run: every duty served once and the exporter agreeing "
          f"{started['seconds']:.2f}s after /readyz")
    final = seen["final"]
    assert final["ok"], final
    assert all(len(names) == 1 for names in final["holders"].values()), final
    assert final["served"] == {"master-a": 1.0, "master-b": 1.0}, final
    audit_log = (work / "exporter.log").read_text()
    assert "came back active" not in audit_log  # nobody fenced on the second start
    assert audit_log.count("is its holder now") == 2  # adopted, logged once each
