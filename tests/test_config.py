"""Config validation as an operator meets it: check-config's exit code and key paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import (
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
    monkeypatch.setenv("HA_EXPORTER_TOKEN", "from-env")
    assert read_token(cfg.api) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    cfg2 = load_config_text(
        GOOD.replace("api: {token_env: HA_EXPORTER_TOKEN}", f"api: {{token_file: {token_file}}}")
    )
    assert read_token(cfg2.api) == "from-file"
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
