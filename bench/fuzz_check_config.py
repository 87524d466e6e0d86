"""Fuzz `ha-exporter check-config` in-process and count what it does with each input.

Run: python -m bench.fuzz_check_config [--inputs 10000] [--seed 1] [--save DIR]

Each input is written to a file and passed to ``exporter.cli.main(["check-config", PATH])``.
An input is *accepted* (exit 0, and the loaded config holds only finite numbers), *rejected*
(exit 2, every error line with its key path or file/YAML position), or *crashed*: an
exception out of main(), another exit code, a traceback or a malformed error line in the
output, or an accepted config holding nan/inf. Crashed must be 0. ``--save`` keeps every
crashing input there for replay.

Inputs, from one seeded generator (the same inputs on every run with the same seed):
  schema   the full config schema (every section, hooks included) with 1-4 mutated leaves:
           wrong types, nan/inf, huge and negative numbers, unknown keys, deleted keys,
           nesting, repeated masters (written as YAML aliases)
  text     a valid config's text with tokens spliced in, lines cut, repeated or swapped
  bytes    random bytes and YAML token soup
  special  deep nesting (up to 20,000 levels), alias bombs, merge cycles, non-UTF-8 and
           UTF-16 files, numbers of hundreds of digits at every numeric key, a file over the
           size cap
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from exporter.cli import main
from exporter.config import MAX_CONFIG_BYTES, ConfigError, load_config, parse_config

FULL: dict[str, Any] = parse_config({
    "masters": [
        {"name": "a", "url": "http://127.0.0.1:9201", "region": "uae", "priority": 1},
        {"name": "b", "url": "http://127.0.0.1:9202", "region": "usa", "weight": 2},
        {"name": "c", "url": "http://127.0.0.1:9203", "role": "standby",
         "failover_regions": ["uae"]},
    ],
    "balancing": {"region_fallback": ["uae"]},
    "failover": {
        "pre_hook": {"url": "http://127.0.0.1:9300/pre", "body": '{"m": "{{ master }}"}'},
        "post_hook": {"url": "http://127.0.0.1:9300/post"},
    },
    "alertmanager": {"url": "http://127.0.0.1:9093"},
}).model_dump(mode="python", by_alias=True)
FULL_TEXT = yaml.safe_dump(FULL, sort_keys=False)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
EXAMPLE_TEXT = (Path(__file__).parent.parent / "examples" / "ha-exporter.yml").read_text()

NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**400, -(10**400), 0.0, -0.0,
    1e-320, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, 99.5,
    "", " ", "0", "0s", "-1s", "1ms", "99ms", "100ms", "5s", "1h30m", "7d", "8d", "1m30", "5 s",
    "9" * 400 + "s", "9" * 400, "1e400", "nan", ".inf", "10%", "-10%", "101%", "nan%", "1e400%",
    "http://x", "HTTP://X:80/", "http://h:0", "http://h:99999", "http://h:-1", "http://[::1",
    "ftp://x", "http://a b", "http://h\x00", "http://", "//h", "http://h/\u00e9",
    "{{ x", "{% if %}", "{{ x }}", '{"a": {{ master | tojson }}}', "{% for %}{% endfor %}",
    "{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "{{ ''.__class__.__mro__ }}",
    "\x00", "\x1b[31m", "\u202e", "\ud800", "a" * 5000, "/health", "health", "round_robin",
    "geo", "active", "standby", "manual", "auto", "allow", "never", "HA_EXPORTER_TOKEN",
    "BAD NAME", "2001-01-01", [], {}, [1, [2, [3]]], {"x": {"y": 1}}, ["uae", None],
]
TOKENS = [
    "&a ", "*a", "<<: *a", "<<: [*a, *a]", "? ", "!!set ", "!!binary ", "!!python/tuple ",
    "!!timestamp ", "!foo ", "%YAML 1.1\n", "---\n", "...\n", "'", '"', "\\", "#", "|\n",
    ">\n", "\t", "\x00", "\x85", "\ufeff", ".nan", ".inf", "-.inf", "1e400", "1.0e+400",
    "9" * 500, "9" * 5000, "2001-13-45", "2001-02-30 25:61:61", "0x" + "f" * 300, "1:30",
    "190:20:30", "~", "yes", "{", "}", "[", "]", ",", ": ", "- ", "\n", "  ", "[[[[", "]]]]",
    "{a: {b: {c:", "? [a, b]: 1\n", "{[1]: 2}", "{? {a: 1}: 2}", "&x [*x]",
]


def key_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a parsed document, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from key_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from key_paths(value, (*prefix, i))


def _nested(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice(NASTY[:20])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def _value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(NASTY)
    if roll < 0.7:
        return rng.randint(-(2**70), 2**70)
    if roll < 0.8:
        return rng.uniform(-1e6, 1e6)
    if roll < 0.9:
        return "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    return _nested(rng, rng.randint(1, 60))


def gen_schema(rng: random.Random) -> bytes:
    doc = copy.deepcopy(FULL)
    for _ in range(rng.randint(1, 4)):
        paths = list(key_paths(doc))
        path = rng.choice(paths)
        how = rng.choice(["replace", "replace", "replace", "delete", "unknown", "repeat"])
        if not path:
            doc = _value(rng) if how == "replace" else doc
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if how == "replace":
            parent[path[-1]] = _value(rng)
        elif how == "delete":
            del parent[path[-1]]
        elif how == "unknown" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][rng.choice(["zz", "colour", "Interval", "for_", ""])] = _value(rng)
        elif how == "repeat" and isinstance(doc, dict) and isinstance(doc.get("masters"), list):
            if doc["masters"]:
                doc["masters"].extend([doc["masters"][0]] * rng.randint(1, 50))
    unicode = rng.random() < 0.5
    try:
        text = yaml.dump(doc, Dumper=DUMPER, sort_keys=False, allow_unicode=unicode)
    except UnicodeEncodeError:  # libyaml's emitter refuses lone surrogates; PyYAML's escapes them
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=unicode)
    return text.encode("utf-8", "surrogatepass")


def gen_text(rng: random.Random) -> bytes:
    lines = rng.choice([FULL_TEXT, EXAMPLE_TEXT]).splitlines(keepends=True)
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(lines))
        roll = rng.random()
        if roll < 0.5:
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(TOKENS) + lines[i][at:]
        elif roll < 0.65:
            del lines[i]
        elif roll < 0.8:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif roll < 0.9:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i][: rng.randint(0, len(lines[i]))]
        if not lines:
            lines = ["\n"]
    return "".join(lines).encode("utf-8", "surrogatepass")


def gen_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(0, 400))
    return "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 60))).encode(
        "utf-8", "surrogatepass"
    )


def gen_special(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    n = rng.choice([10, 33, 100, 999, 1000, 5000, 20000])
    if kind == 0:  # flow nesting
        open_, close = rng.choice([("[", "]"), ("{a: ", "}")])
        return f"masters: {open_ * n}1{close * n}\n".encode()
    if kind == 1:  # block nesting
        return "".join(" " * i + "- \n" for i in range(min(n, 3000))).encode()
    if kind == 2:  # alias bomb: each level lists the previous one ten times
        levels = rng.randint(2, 12)
        out = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        out += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
        out.append(f"masters: [{{name: m, url: 'http://x', failover_regions: *a{levels - 1}}}]")
        return "\n".join(out).encode()
    if kind == 3:  # merge chains and cycles
        levels = rng.randint(1, 400)
        out = ["d0: &d0 {name: m, url: 'http://x'}"]
        out += [f"d{i}: &d{i} {{<<: [*d{i - 1}, *d{i - 1}]}}" for i in range(1, levels)]
        out.append(f"masters: [*d{levels - 1}]")
        if rng.random() < 0.3:
            out.append("c: &c {<<: *c}")
        return "\n".join(out).encode()
    if kind == 4:  # another encoding
        text = FULL_TEXT.replace("uae", "uaé")
        return text.encode(rng.choice(["latin-1", "utf-16", "utf-16-le", "utf-32", "cp1252"]))
    if kind == 5:  # a long number at every numeric key of the example
        digits = "9" * rng.choice([20, 309, 400, 999, 1001, 4301])
        text = EXAMPLE_TEXT
        for key in ("port", "weight", "failure_threshold", "queue_warning", "priority",
                    "imbalance_ratio", "max_recovery_attempts"):
            text = text.replace(f"{key}: ", f"{key}: {digits} #", 1)
        return text.encode()
    if kind == 6 and rng.random() < 0.05:  # over the size cap (rarely: it is a big write)
        return b"#" * (MAX_CONFIG_BYTES + 1)
    masters = "\n".join(  # many masters sharing one URL, or one name
        f"  - {{name: m{i if rng.random() < 0.9 else 0}, url: 'http://h:1'}}"
        for i in range(rng.randint(2, 500))
    )
    return f"masters:\n{masters}\n".encode()


GENERATORS: list[tuple[str, float, Callable[[random.Random], bytes]]] = [
    ("schema", 0.5, gen_schema),
    ("text", 0.25, gen_text),
    ("bytes", 0.1, gen_bytes),
    ("special", 0.15, gen_special),
]


def _non_finite(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63


def judge(path: Path) -> tuple[str, str]:
    """("accepted" | "rejected" | "crashed", why) for one input file."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check-config", str(path)])
    except (Exception, SystemExit) as exc:  # what escapes main() is what is counted
        return "crashed", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    printed = out.getvalue() + err.getvalue()
    if "Traceback" in printed:
        return "crashed", "traceback in the output"
    if code == 0:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            return "crashed", f"check-config accepted, load_config refused: {exc.errors[:2]}"
        if _non_finite(cfg.model_dump()):
            return "crashed", "accepted a config holding nan, inf or a huge integer"
        return "accepted", ""
    if code == 2:
        lines = err.getvalue().splitlines()
        if not lines or not lines[0].startswith(f"{path}: "):
            return "crashed", f"no error summary: {printed[:200]!r}"
        bad = [line for line in lines[1:] if not (line.startswith("  ") and ": " in line)]
        if bad or len(lines) < 2:
            return "crashed", f"malformed error lines: {bad[:2]!r}"
        return "rejected", lines[1].strip()
    return "crashed", f"exit code {code}"


def run(inputs: int, seed: int, save: Path | None) -> int:
    rng = random.Random(seed)
    names = [name for name, _, _ in GENERATORS]
    weights = [w for _, w, _ in GENERATORS]
    gens = {name: gen for name, _, gen in GENERATORS}
    counts: Counter[tuple[str, str]] = Counter()
    crashes: list[tuple[str, str, bytes]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-check-config-") as tmp:
        path = Path(tmp) / "config.yml"
        for _ in range(inputs):
            kind = rng.choices(names, weights)[0]
            data = gens[kind](rng)
            path.write_bytes(data)
            verdict, why = judge(path)
            counts[(kind, verdict)] += 1
            if verdict == "crashed":
                crashes.append((kind, why, data))
    seconds = time.perf_counter() - started
    total = Counter(verdict for (_, verdict), n in counts.items() for _ in range(n))
    for kind in names:
        row = ", ".join(f"{v} {counts[(kind, v)]}" for v in ("accepted", "rejected", "crashed"))
        print(f"  {kind:<8} {row}")
    print(
        f"check-config fuzz: {inputs} inputs (seed {seed}): accepted {total['accepted']}, "
        f"rejected {total['rejected']}, crashed {total['crashed']} in {seconds:.1f} s"
    )
    for i, (kind, why, data) in enumerate(crashes[:20]):
        print(f"  crash {i} ({kind}): {why}")
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            (save / f"crash-{i}.yml").write_bytes(data)
    return 1 if crashes else 0


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save", type=Path, default=None, help="directory for crashing inputs")
    args = ap.parse_args()
    return run(args.inputs, args.seed, args.save)


if __name__ == "__main__":
    sys.exit(cli())
