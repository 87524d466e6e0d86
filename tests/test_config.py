"""Config validation as an operator meets it: check-config's exit code and key paths."""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import exporter.config
from exporter.cli import main
from exporter.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    format_duration,
    load_config,
    load_config_text,
    parse_duration,
    read_token,
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "ha-exporter.yml"
GOOD = EXAMPLE.read_text()


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    return info.value.errors


def test_example_config_loads_with_contract_values():
    cfg = load_config(EXAMPLE)
    assert cfg.probe.interval == 5.0 and cfg.probe.timeout == 2.0
    assert cfg.probe.degraded_latency == 0.5 and cfg.probe.jitter == pytest.approx(0.1)
    assert [m.name for m in cfg.masters] == ["master-a", "master-b", "master-c"]
    assert cfg.balancing.panic_threshold == 0.5 and cfg.balancing.rebalance.for_ == 30.0
    assert cfg.failover.cooldown == 60.0 and cfg.alertmanager is not None


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.replace('"http://127.0.0.1:9203"', '"ftp://x"'), "masters[2].url:"),
        (
            lambda t: t.replace("jitter: 10%", "jitter: 10%, colour: red"),
            "probe.colour: unknown key",
        ),
        (
            lambda t: t.replace("interval: 5s", "interval: 5 seconds"),
            "probe.interval: invalid duration",
        ),
        (
            lambda t: t.replace("timeout: 2s", "timeout: 9s"),
            "probe.timeout: must be greater than 0",
        ),
        (lambda t: t.replace("name: master-b", "name: master-a"), "masters[1].name: duplicate"),
        (lambda t: t.replace("strategy: round_robin", "strategy: random"), "balancing.strategy:"),
        (lambda t: t.replace("priority: 1,", "priority: -1,"), "masters[0].priority:"),
        (
            lambda t: t.replace("queue_warning: 100", "queue_warning: 900"),
            "thresholds.queue_critical: must be at least queue_warning",
        ),
        (lambda t: t.replace("for: 30s", "for: soon"), "balancing.rebalance.for: invalid duration"),
        (lambda t: t + "state_path: again.db\n", "duplicate key 'state_path'"),
        (lambda t: t.replace("masters:", "mastres:"), "mastres: unknown key"),
        (lambda t: "listen: [", "(yaml line"),
    ],
)
def test_each_bad_config_names_its_key(mutate, expected):
    errs = errors_of(mutate(GOOD))
    assert any(expected in e for e in errs), errs


def test_every_error_is_reported_not_just_the_first():
    text = (
        GOOD.replace('"ftp"', "")
        .replace("jitter: 10%", "jitter: 10%, a: 1")
        .replace("cooldown: 60s", "cooldown: never")
    )
    errs = errors_of(text)
    assert any(e.startswith("probe.a:") for e in errs)
    assert any(e.startswith("failover.cooldown:") for e in errs)


def test_durations_round_trip():
    for text, seconds in [("500ms", 0.5), ("5s", 5), ("1m", 60), ("1h30m", 5400), ("1m30s", 90)]:
        assert parse_duration(text) == seconds
        assert parse_duration(format_duration(seconds)) == seconds


def test_token_from_env_or_file_never_from_yaml(tmp_path, monkeypatch):
    cfg = load_config(EXAMPLE)
    monkeypatch.setenv("HA_EXPORTER_TOKEN", "from-env-0123456789")
    assert read_token(cfg.api) == "from-env-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text("from-file-0123456789\n")
    cfg2 = load_config_text(
        GOOD.replace("api: {token_env: HA_EXPORTER_TOKEN}", f"api: {{token_file: {token_file}}}")
    )
    assert read_token(cfg2.api) == "from-file-0123456789"
    errs = errors_of(GOOD.replace("api: {token_env: HA_EXPORTER_TOKEN}", "api: {token: abc}"))
    assert errs == ["api.token: unknown key"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, timeout=30
    )


def test_check_config_exit_codes(tmp_path):
    ok = run_cli("check-config", str(EXAMPLE))
    assert ok.returncode == 0
    assert ok.stdout.startswith("config ok: 3 masters (1 standby) in 2 regions")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        GOOD.replace('"http://127.0.0.1:9203"', '"nope"').replace(
            "jitter: 10%", "jitter: 10%, x: 1"
        )
    )
    res = run_cli("check-config", str(bad))
    assert res.returncode == 2
    assert "masters[2].url: 'nope' is not an http(s) URL" in res.stderr
    assert "probe.x: unknown key" in res.stderr
    missing = run_cli("check-config", str(tmp_path / "absent.yml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


FLEET = """\
probe: {interval: 5s, timeout: 2s}
masters:
  # eu: defaults anchored where they are first used
  - <<: &eu
      region: eu
      priority: 10
      failover_regions: [eu, us]
    name: eu-1
    url: http://10.0.1.1:9000
  - <<: *eu
    name: eu-2
    url: http://10.0.1.2:9000
    weight: 2
  - <<: *eu
    name: eu-3
    url: http://10.0.1.3:9000
    priority: 20          # an explicit key overrides the merged one
  # us standbys: a list of mappings, the earlier one wins a shared key
  - &us-1
    <<: [&standby {role: standby, priority: 90, failover: never}, &us {region: us, priority: 50}]
    name: us-1
    url: http://10.0.2.1:9000
  - <<: [*standby, *us]
    name: us-2
    url: http://10.0.2.2:9000
  # whole master merged: only the name and URL differ
  - <<: *us-1
    name: us-3
    url: http://10.0.2.3:9000
balancing: {strategy: geo, region_fallback: [eu]}
"""


def test_merge_keys_build_a_fleet_from_shared_defaults():
    cfg = load_config_text(FLEET)
    got = {m.name: (m.region, m.priority, m.role, m.weight, m.failover, m.failover_regions)
           for m in cfg.masters}
    assert got == {
        "eu-1": ("eu", 10, "active", 1.0, "allow", ["eu", "us"]),
        "eu-2": ("eu", 10, "active", 2.0, "allow", ["eu", "us"]),
        "eu-3": ("eu", 20, "active", 1.0, "allow", ["eu", "us"]),
        "us-1": ("us", 90, "standby", 1.0, "never", []),
        "us-2": ("us", 90, "standby", 1.0, "never", []),
        "us-3": ("us", 90, "standby", 1.0, "never", []),
    }
    assert [m.url for m in cfg.masters][-1] == "http://10.0.2.3:9000"


def test_duplicate_key_inside_a_merged_mapping_is_named_with_its_line():
    text = FLEET.replace("      priority: 10\n", "      priority: 10\n      region: us\n")
    assert errors_of(text) == ["(yaml line 7, column 7): duplicate key 'region'"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (  # an explicit key twice next to a merge
            lambda t: t.replace("    weight: 2\n", "    weight: 2\n    weight: 3\n"),
            "(yaml line 14, column 5): duplicate key 'weight'",
        ),
        (  # a merged key repeated explicitly is an override, but two merges are a duplicate
            lambda t: t.replace("  - <<: *eu\n    name: eu-2\n", "  - <<: *eu\n    <<: *eu\n"
                                "    name: eu-2\n"),
            "(yaml line 11, column 5): duplicate key '<<'",
        ),
        (
            lambda t: t.replace("  - <<: *eu\n    name: eu-3", "  - <<: eu\n    name: eu-3"),
            "(yaml line 14, column 9): << (merge) expects a mapping or a list of mappings",
        ),
    ],
    ids=["explicit-duplicate", "two-merges", "merge-of-a-scalar"],
)
def test_bad_merges_and_duplicates_name_key_and_line(mutate, expected):
    errs = errors_of(mutate(FLEET))
    assert len(errs) == 1 and errs[0].startswith(expected), errs


# --- check-config never crashes: every input is a config or errors with where they are -------


def check_config(path: Path) -> tuple[int, str]:
    """`ha-exporter check-config PATH` in-process: exit code and stderr (logging restored)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check-config", str(path)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, err.getvalue()


def _at(key: str, value: str) -> str:
    """GOOD with one scalar replaced, by key."""
    spots = {
        "interval": "interval: 5s", "port": "port: 9108", "weight": "weight: 1}",
        "jitter": "jitter: 10%", "queue_warning": "queue_warning: 100",
        "imbalance_ratio": "imbalance_ratio: 2.0", "priority": "priority: 1,",
        "cooldown": "cooldown: 60s",
    }
    old = spots[key]
    new = f"{key}: {value}" + ("}" if old.endswith("}") else "," if old.endswith(",") else "")
    assert old in GOOD
    return GOOD.replace(old, new, 1)


HUGE = "9" * 400
NUMBERS = {  # key -> its path in errors
    "interval": "probe.interval", "port": "listen.port", "weight": "masters[0].weight",
    "jitter": "probe.jitter", "queue_warning": "thresholds.queue_warning",
    "imbalance_ratio": "balancing.rebalance.imbalance_ratio", "priority": "masters[0].priority",
    "cooldown": "failover.cooldown",
}
CRASHERS: list[tuple[str, bytes, str]] = [
    ("latin-1", GOOD.replace("uae", "ua\xe9").encode("latin-1"),
     "(file): not UTF-8: byte 0xe9 on line 8"),
    ("utf-16", GOOD.encode("utf-16"), "(file): not UTF-8"),
    ("unhashable-complex-key", b"? [a, b]: 1\n", "(yaml line 1, column 3): found an unhashable"),
    ("unhashable-flow-key", b"{[1]: 2}\n", "(yaml line 1, column 2): found an unhashable key"),
    ("unhashable-set-key", b"? !!set {a}: 1\n", "found an unhashable key"),
    ("nested-lists", b"masters: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "(yaml line 1, "),
    ("nested-maps", b"masters: " + b"{a: " * 10_000 + b"1" + b"}" * 10_000 + b"\n",
     "(yaml line 1, "),
    ("nested-blocks", "".join(" " * i + "- \n" for i in range(2000)).encode(), "(yaml line "),
    ("recursive-alias", b"masters: &a [*a]\n", "an alias refers to the collection it is in"),
    ("merge-cycle", b"a: &a {<<: *a}\n", "an alias refers to the collection it is in"),
    ("alias-bomb", ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
    )).encode(), "values once aliases are expanded"),
    ("bad-date", GOOD.replace("./ha-exporter.db", "2001-13-45").encode(),
     "cannot read '2001-13-45' as timestamp: month must be in 1..12"),
    ("bad-tagged-date", b"state_path: !!timestamp x\n", "cannot read 'x' as timestamp"),
    ("integer-of-5000-digits", _at("port", "9" * 5000).encode(),
     "an integer of 5000 digits is too large"),
    ("nul-character", GOOD.replace("uae", "u\0ae").encode(), "(yaml line 8, column "),
    *[(f"nan-{key}", _at(key, ".nan").encode(), f"{path}: ") for key, path in NUMBERS.items()],
    *[(f"inf-{key}", _at(key, ".inf").encode(), f"{path}: ") for key, path in NUMBERS.items()],
    *[(f"1e400-{key}", _at(key, "1.0e+400").encode(), f"{path}: ")
      for key, path in NUMBERS.items()],
    *[(f"huge-{key}", _at(key, HUGE).encode(), f"{path}: ") for key, path in NUMBERS.items()],
    ("huge-duration-string", _at("interval", HUGE + "s").encode(), "probe.interval: duration"),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CRASHERS],
                         ids=[c[0] for c in CRASHERS])
def test_check_config_refuses_hostile_input_with_where_not_a_traceback(tmp_path, data, expected):
    path = tmp_path / "config.yml"
    path.write_bytes(data)
    code, err = check_config(path)
    assert code == 2 and "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[0].startswith(f"{path}: ") and all(line.startswith("  ") for line in lines[1:])
    assert any(expected in line for line in lines), err


@pytest.mark.parametrize("name", ["nested-lists", "nested-maps", "nested-blocks",
                                  "recursive-alias", "alias-bomb", "bad-date"])
def test_the_pure_python_loader_refuses_the_same(monkeypatch, name):
    """Without libyaml, PyYAML's own composer recurses per level: capped as it composes."""
    monkeypatch.setattr(exporter.config, "_LOADER", exporter.config._PureLoader)
    data = next(c[1] for c in CRASHERS if c[0] == name)
    errs = errors_of(data.decode())
    assert len(errs) == 1 and errs[0].startswith("(yaml line "), errs


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.yml"
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    code, err = check_config(path)
    assert code == 2 and f"is larger than {MAX_CONFIG_BYTES // 2**20} MiB" in err, err
    directory = check_config(tmp_path)
    assert directory[0] == 2 and "(file): cannot read" in directory[1]


def test_check_config_process_prints_no_traceback_on_deep_nesting(tmp_path):
    path = tmp_path / "deep.yml"
    path.write_bytes(b"masters: " + b"[" * 10_000 + b"]" * 10_000 + b"\n")
    res = run_cli("check-config", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[1].startswith("  (yaml line 1, column ")


# --- accepted only what runs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.replace("weight: 1}", "weight: .inf}"), "masters[0].weight: must be a finite"),
        (lambda t: t.replace("weight: 1}", "weight: .nan}"), "masters[0].weight: must be a fini"),
        (lambda t: t.replace("weight: 1}", "weight: -1}"), "masters[0].weight: Input should be"),
        (lambda t: t.replace("weight: 1}", "weight: 1.0e+7}"), "masters[0].weight: Input should"),
        (lambda t: t.replace("weight: 1}", "weight: 0.0001}"), "masters[0].weight: must be 0"),
        (lambda t: t.replace("weight: 1}", "weight: yes}"), "masters[0].weight: expected a numb"),
        (lambda t: t.replace("interval: 5s", "interval: 0s"), "probe.interval: must be at least"),
        (lambda t: t.replace("interval: 5s", "interval: 99ms"), "probe.interval: must be at least"),
        (lambda t: t.replace("timeout: 2s", "timeout: 1ms"), "probe.timeout: must be at least 10"),
        (lambda t: t.replace("cooldown: 60s", "cooldown: -1"), "failover.cooldown: must not be n"),
        (lambda t: t.replace("cooldown: 60s", "cooldown: 8d"), "failover.cooldown: must be at mo"),
        (lambda t: t.replace("cooldown: 60s", "step_timeout: 0"),
         "failover.step_timeout: must be at least 100ms"),
        (lambda t: t.replace("checkpoint_interval: 10s", "checkpoint_interval: 0"),
         "failover.checkpoint_interval: must be at least 100ms"),
        (lambda t: t.replace("cooldown: 60s", "deadline: 50ms"),
         "failover.deadline: must be at least 100ms"),
        (lambda t: t.replace("panic_threshold: 50%", "panic_threshold: nan%"),
         "balancing.panic_threshold: must be between"),
        (lambda t: t.replace("port: 9108", "port: 65536"), "listen.port: Input should be less"),
        (lambda t: t.replace("port: 9108", "port: 9108.0"),
         "listen.port: expected an integer, got the number 9108.0"),
        (lambda t: t.replace("port: 9108", "port: '9108'"),
         "listen.port: expected an integer, got the string '9108'"),
        (lambda t: t.replace("port: 9108", "port: true"), "listen.port: expected an integer"),
        (lambda t: t.replace("failure_threshold: 3", "failure_threshold: 3.5"),
         "probe.failure_threshold: expected an integer"),
        (lambda t: t.replace(":9201", ":99999"), "masters[0].url: 'http://127.0.0.1:99999' is n"),
        (lambda t: t.replace(":9201", ":0"), "masters[0].url: 'http://127.0.0.1:0': the port"),
        (lambda t: t.replace('"http://127.0.0.1:9093"', '"nope"'), "alertmanager.url: 'nope' is"),
        (lambda t: t.replace("name: master-a", 'name: "master\\ta"'),
         "masters[0].name: 'master\\ta' contains a control"),
        (lambda t: t.replace("token_env: HA_EXPORTER_TOKEN", "token_env: 'A B'"),
         "api.token_env: 'A B' is not an environment variable name"),
        (lambda t: t.replace("state_path: ./ha-exporter.db", "state_path: ''"),
         "state_path: must be a non-empty file path"),
        (lambda t: t.replace("listen: {host: 127.0.0.1, port: 9108}", "listen: []"),
         "listen: expected a mapping of keys, got a list"),
        (lambda t: t.replace("jitter: 10%", "jitter: 10%, true: 1"),
         "probe: key true is not a string"),
    ],
)
def test_values_that_break_at_run_time_are_refused_at_load(mutate, expected):
    errs = errors_of(mutate(GOOD))
    assert any(e.startswith(expected) for e in errs), errs


def test_weight_zero_means_no_traffic_and_is_kept():
    cfg = load_config_text(GOOD.replace("weight: 1}", "weight: 0}"))
    assert cfg.masters[0].weight == 0.0


def _with_hook(body: str) -> str:
    hooks = f"pre_hook: {{url: 'http://127.0.0.1:9300/pre', body: {body}}}, "
    return GOOD.replace("max_recovery_attempts: 5,", f"max_recovery_attempts: 5, {hooks}")


def test_hook_body_templates_are_compiled_at_load():
    assert load_config_text(_with_hook("'{\"master\": \"{{ master }}\"}'")).failover.pre_hook
    assert errors_of(_with_hook("'{{ master '")) == [
        "failover.pre_hook.body: template error at line 1: unexpected end of template, "
        "expected 'end of print statement'."
    ]
    errs = errors_of(_with_hook('"{\\n{% if x %}\\n}"'))
    assert errs[0].startswith("failover.pre_hook.body: template error at line 2: "), errs
    deep = errors_of(_with_hook("'{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}'"))
    assert deep[0].startswith("failover.pre_hook.body: template error"), deep
    post = GOOD.replace("max_recovery_attempts: 5,", "max_recovery_attempts: 5, "
                        "post_hook: {url: 'http://h/p', body: '{% x %}'},")
    assert errors_of(post)[0].startswith("failover.post_hook.body: template error at line 1: ")


def _fleet(urls: list[str], shared: list[bool] | None = None) -> str:
    shared = shared or [False] * len(urls)
    items = "".join(f"  - {{name: m{i}, url: '{u}', shared_url: {str(s).lower()}}}\n"
                    for i, (u, s) in enumerate(zip(urls, shared, strict=True)))
    return f"masters:\n{items}"


def test_duplicate_master_urls_are_refused_naming_both():
    assert errors_of(_fleet(["http://h:1", "http://h:2/", "http://H:1/"])) == [
        "masters[2].url: master 'm2' has the same URL as masters[0] 'm0' ('http://H:1'); "
        "if they share it on purpose, set shared_url: true on both"
    ]
    assert len(errors_of(_fleet(["http://h:80/x", "http://h/x"]))) == 1  # default port
    assert len(errors_of(_fleet(["https://h", "https://h:443"]))) == 1
    assert len(errors_of(_fleet(["http://h:1"] * 1000))) == 999
    load_config_text(_fleet(["http://h:1/a", "http://h:1/b", "https://h:1/a"]))  # distinct


def test_shared_url_marks_a_shared_master_on_purpose():
    cfg = load_config_text(_fleet(["http://h:1"] * 3, [True] * 3))
    assert [m.shared_url for m in cfg.masters] == [True] * 3
    errs = errors_of(_fleet(["http://h:1"] * 3, [True, False, True]))
    assert [e.split(":")[0] for e in errs] == ["masters[1].url"]


def test_duplicate_names_are_all_reported():
    errs = errors_of(_fleet(["http://h:1", "http://h:2", "http://h:3"]).replace("m2", "m0")
                     .replace("m1", "m0"))
    assert errs == [
        "masters[1].name: duplicate master name 'm0' (first at masters[0])",
        "masters[2].name: duplicate master name 'm0' (first at masters[0])",
    ]


# --- the API token -------------------------------------------------------------------------


def test_short_or_blank_tokens(tmp_path, monkeypatch):
    api = load_config(EXAMPLE).api
    for blank in ("", "   ", "\t\n"):
        monkeypatch.setenv("HA_EXPORTER_TOKEN", blank)
        assert read_token(api) is None  # no token: refused at start unless --insecure-no-auth
    monkeypatch.setenv("HA_EXPORTER_TOKEN", "  short-secret  ")
    with pytest.raises(ConfigError) as info:
        read_token(api)
    assert info.value.errors == [
        "api.token_env: $HA_EXPORTER_TOKEN: the API token is 12 characters long, it must be at "
        "least 16 (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
    ]
    monkeypatch.setenv("HA_EXPORTER_TOKEN", " " + "x" * 16 + "\n")
    assert read_token(api) == "x" * 16
    token_file = tmp_path / "token"
    token_file.write_text("fifteen-chars!!\n")
    file_api = load_config_text(
        GOOD.replace("api: {token_env: HA_EXPORTER_TOKEN}", f"api: {{token_file: {token_file}}}")
    ).api
    with pytest.raises(ConfigError, match=r"^api.token_file: .* is 15 characters long") as info:
        read_token(file_api)
    assert "fifteen" not in str(info.value)
    token_file.write_bytes(b"\xff" * 20)
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        read_token(file_api)


def run_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None,
                 *flags: str) -> tuple[int, str]:
    """`ha-exporter run` in-process up to its token check (every case here stops there)."""
    if token is None:
        monkeypatch.delenv("HA_EXPORTER_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HA_EXPORTER_TOKEN", token)
    path = tmp_path / "config.yml"
    path.write_text(GOOD)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["run", "--config", str(path), *flags])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("token", "flags", "expected"),
    [
        ("short-secret", (), "refusing to start: api.token_env: $HA_EXPORTER_TOKEN: the API "
                             "token is 12 characters long, it must be at least 16"),
        ("short-secret", ("--insecure-no-auth",), "it must be at least 16"),
        ("   ", (), "refusing to start: mutating endpoints need a bearer token of at least 16 "
                   "characters and $HA_EXPORTER_TOKEN holds none"),
        (None, (), "$HA_EXPORTER_TOKEN holds none (unset, empty or only whitespace)"),
    ],
    ids=["short", "short-even-insecure", "whitespace", "unset"],
)
def test_run_refuses_a_missing_or_short_token_in_one_line(tmp_path, monkeypatch, token, flags,
                                                          expected):
    code, err = run_exporter(tmp_path, monkeypatch, token, *flags)
    assert code == 2 and err.count("\n") == 1 and err.startswith("refusing to start: "), err
    assert expected in err
    assert token is None or not token.strip() or token not in err


async def test_a_reload_refused_at_load_keeps_the_running_config_and_token(tmp_path,
                                                                           monkeypatch):
    """What check-config refuses, a reload (SIGHUP, POST /-/reload) refuses too."""
    from exporter.service import Service

    monkeypatch.setenv("HA_CFG_TEST_TOKEN", "t" * 16)
    path = tmp_path / "config.yml"
    good = (_fleet(["http://127.0.0.1:1", "http://127.0.0.1:2"])
            + f"state_path: {tmp_path / 'state.db'}\napi: {{token_env: HA_CFG_TEST_TOKEN}}\n")
    path.write_text(good)
    svc = Service(load_config(path), path, token=read_token(load_config(path).api))
    try:
        for bad, error in [
            ("failover: {step_timeout: 0}\n", "failover.step_timeout: must be at least 100ms"),
            ("failover: {checkpoint_interval: 0}\n",
             "failover.checkpoint_interval: must be at least 100ms"),
            ("thresholds: {queue_warning: .inf}\n",
             "thresholds.queue_warning: expected an integer, got .inf"),
        ]:
            path.write_text(good + bad)
            assert await svc.reload() == (False, [error])
            assert svc.config.failover.step_timeout == 5.0
        path.write_text(good)
        monkeypatch.setenv("HA_CFG_TEST_TOKEN", "short")
        ok, errors = await svc.reload()
        assert not ok and "is 5 characters long" in errors[0] and svc.token == "t" * 16
    finally:
        await svc.close()


def test_cluster_section_defaults_and_absence():
    assert load_config_text(GOOD).cluster is None  # the embedded default: a single node
    cfg = load_config_text(GOOD + "\ncluster: {etcd: {endpoints: ['http://127.0.0.1:2379']}}\n")
    assert cfg.cluster is not None
    c = cfg.cluster
    assert (c.etcd.prefix, c.etcd.timeout, c.member, c.url) == ("/ha-exporter", 2.0, None, None)
    assert (c.lease_ttl, c.observers, c.quorum) == (10.0, 2, 2)


@pytest.mark.parametrize(("section", "expected"), [
    ("{etcd: {endpoints: []}}", "cluster.etcd.endpoints: List should have at least 1 item"),
    ("{etcd: {endpoints: ['unix://relative.sock']}}",
     "cluster.etcd.endpoints[0]: 'unix://relative.sock': a unix endpoint is unix:///absolute"),
    ("{etcd: {endpoints: ['ftp://x']}}", "cluster.etcd.endpoints[0]:"),
    ("{etcd: {endpoints: ['http://e:2379'], prefix: 'no-slash'}}",
     "cluster.etcd.prefix: 'no-slash' is not a key prefix"),
    ("{etcd: {endpoints: ['http://e:2379']}, lease_ttl: 1s}",
     "cluster.lease_ttl: must be at least 2s"),
    ("{etcd: {endpoints: ['http://e:2379']}, observers: 2, quorum: 3}",
     "cluster.quorum: 3 is more than observers (2)"),
    ("{etcd: {endpoints: ['http://e:2379']}, observers: 0}", "cluster.observers:"),
    ("{etcd: {endpoints: ['http://e:2379']}, leader: me}", "cluster.leader: unknown key"),
])
def test_a_bad_cluster_section_names_its_key(section: str, expected: str) -> None:
    errors = errors_of(GOOD + f"\ncluster: {section}\n")
    assert any(e.startswith(expected) for e in errors), errors
