"""Fuzzing the config loader and `ha-exporter check-config`: whatever the input, the loader
returns a Config or raises ConfigError, check-config exits 0 or 2 and never prints a
traceback, and a config that loads holds only finite numbers.

Fixed seed (``derandomize``) and a bounded budget: the same inputs on every run, a few seconds
in all. bench/fuzz_check_config.py runs the same property over 10,000 inputs of its own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_check_config import FULL, NASTY, key_paths
from exporter.cli import main
from exporter.config import Config, ConfigError, load_config

FUZZ = settings(
    derandomize=True,
    max_examples=250,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

leaves = st.one_of(
    st.sampled_from(NASTY),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.integers(min_value=1, max_value=60).map(lambda n: _nested(n)),
)


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _mutate(doc: Any, pick: int, how: str, value: Any) -> Any:
    """``doc`` with one change at the ``pick``-th path: replaced, deleted, given an unknown key,
    or (for masters) repeated with the same name or URL."""
    paths = list(key_paths(doc))
    path = paths[pick % len(paths)]
    if not path:
        return value if how == "replace" else doc
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "unknown_key" and isinstance(parent[last], dict):
        parent[last][f"zz_{pick % 7}"] = value
    elif how == "repeat" and isinstance(doc.get("masters"), list) and doc["masters"]:
        doc["masters"].extend([dict(doc["masters"][0])] * (1 + pick % 5))
    return doc


mutations = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10_000),
        st.sampled_from(["replace", "replace", "delete", "unknown_key", "repeat"]),
        leaves,
    ),
    min_size=1,
    max_size=4,
)

YAML_BITS = [
    b"masters:", b"- ", b"  ", b"\n", b": ", b"{", b"}", b"[", b"]", b",", b"&a ", b"*a",
    b"<<: ", b"? ", b"!!set ", b"!!binary ", b"!!python/tuple ", b"!foo ", b"%YAML 1.1\n",
    b"---\n", b"...\n", b"'", b'"', b"\\", b"#", b"|\n", b">\n", b"\t", b"\x00", b"\xff",
    b"\xef\xbb\xbf", b".nan", b".inf", b"1e400", b"9" * 500, b"2001-13-45", b"0x1f", b"1:30",
    b"~", b"yes", b"probe: ", b"interval: ", b"url: http://x", b"name: m", b"weight: ",
]
yamlish_bytes = st.lists(st.sampled_from(YAML_BITS), max_size=40).map(b"".join)


def _finite_numbers(value: Any, path: str = "") -> list[str]:
    """Paths of numbers in a loaded config that are not finite or do not fit 64 bits."""
    bad: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        bad.append(path)
    return bad


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def _kept_logging() -> Iterator[None]:
    """main() points the root logger at the current stderr; give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def check_config(path: Path) -> tuple[int, str]:
    """`ha-exporter check-config PATH` in-process: its exit code and everything it printed."""
    out, err = io.StringIO(), io.StringIO()
    with _kept_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-config", str(path)])
    return code, out.getvalue() + err.getvalue()


def assert_loads_or_refuses(path: Path) -> None:
    """The property: load_config gives a Config with finite numbers or raises ConfigError,
    and check-config agrees, exits 0 or 2 and prints every error with where it is."""
    try:
        cfg: Config | None = load_config(path)
    except ConfigError as exc:
        cfg = None
        assert exc.errors and all(": " in e and "\n" not in e for e in exc.errors), exc.errors
    if cfg is not None:
        assert _finite_numbers(cfg.model_dump()) == []
    code, printed = check_config(path)
    assert "Traceback" not in printed
    assert code == (0 if cfg is not None else 2), printed
    if cfg is None:
        lines = printed.splitlines()
        assert lines[0].startswith(f"{path}: ") and "error(s)" in lines[0], printed
        assert all(line.startswith("  ") and ": " in line for line in lines[1:]), printed


@FUZZ
@given(st.one_of(st.binary(max_size=300), yamlish_bytes))
def test_arbitrary_bytes_load_or_are_refused(workdir: Path, data: bytes) -> None:
    path = workdir / "bytes.yml"
    path.write_bytes(data)
    assert_loads_or_refuses(path)


@FUZZ
@given(mutations)
def test_schema_with_mutated_leaves_loads_or_is_refused(workdir: Path, changes: list) -> None:
    doc = yaml.safe_load(yaml.safe_dump(FULL))  # a deep copy
    for pick, how, value in changes:
        doc = _mutate(doc, pick, how, value)
    path = workdir / "mutated.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert_loads_or_refuses(path)


def test_the_unmutated_schema_document_loads(workdir: Path) -> None:
    """The fuzzed document starts valid, so that a mutation is what makes it fail."""
    path = workdir / "full.yml"
    path.write_text(yaml.safe_dump(FULL, sort_keys=False))
    assert check_config(path)[0] == 0
