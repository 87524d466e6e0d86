"""Render the Prometheus alerting/recording rules (and their promtool unit tests) from a config.

The config is the single source of truth for thresholds: the checked-in ``alert_rules/`` is the
render of ``examples/ha-exporter.yml``, and a test fails when the two drift apart. The unit tests
are rendered from the same values so that ``promtool test rules`` holds for *any* valid config,
not only the default one.

Templates live in ``exporter/templates/rules/`` and use ``[[ ]]`` / ``[% %]`` as jinja2
delimiters, because ``{{ }}`` belongs to Prometheus' own annotation templates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jinja2
import yaml

from exporter.config import Config, format_duration, parse_duration

TEMPLATE_DIR = Path(__file__).parent / "templates" / "rules"
RUNBOOK_URL = "https://github.com/ha-exporter/ha-exporter/blob/main/docs/runbook.md"
DEFAULT_JOB = "ha-exporter"

#: Recording-rule windows of the probe error ratio (SRE workbook, multi-window multi-burn-rate).
SLO_WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")

#: (long window, short window, burn factor, severity, for:) — SRE workbook, table 5-8.
BURN_RATES: tuple[tuple[str, str, float, str, str], ...] = (
    ("1h", "5m", 14.4, "critical", "2m"),
    ("6h", "30m", 6.0, "critical", "15m"),
    ("1d", "2h", 3.0, "warning", "1h"),
    ("3d", "6h", 1.0, "warning", "3h"),
)

#: Step of the rendered promtool unit tests (their series interval and evaluation interval).
TEST_STEP_SECONDS = 5


def num(value: float) -> str:
    """A float as PromQL/YAML text without binary noise: 0.001, not 0.0010000000000000009."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.10f}".rstrip("0").rstrip(".")


def dur(seconds: float) -> str:
    """Seconds to a Prometheus duration ('15s', '2m'); used for for: and windows."""
    return format_duration(seconds)


def window(seconds: float) -> str:
    """A PromQL range selector for a duration in seconds: '[5m]'."""
    return f"[{dur(seconds)}]"


def _whole(seconds: float) -> int:
    """Round a derived duration up to whole seconds: rules are evaluated at most once a second."""
    return max(1, math.ceil(seconds - 1e-9))


def _go_g4(value: float) -> str:
    """Go's ``%.4g``, which Prometheus' humanize functions use (Python's matches it)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.4g}"


def humanize(value: float) -> str:
    """Prometheus' ``humanize`` template function, for expected annotations in unit tests."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return _go_g4(value)
    prefix = ""
    if abs(value) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix, value = p, value / 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(value) >= 1:
                break
            prefix, value = p, value * 1000
    return f"{_go_g4(value)}{prefix}"


def humanize_duration(value: float) -> str:
    """Prometheus' ``humanizeDuration`` template function (seconds in, '1.98s' / '5m 0s' out)."""
    if math.isnan(value) or math.isinf(value):
        return _go_g4(value)
    if value == 0:
        return "0s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        v = abs(value)
        whole = int(v)
        s, m, h, d = whole % 60, (whole // 60) % 60, (whole // 3600) % 24, whole // 86400
        if d:
            return f"{sign}{d}d {h}h {m}m {s}s"
        if h:
            return f"{sign}{h}h {m}m {s}s"
        if m:
            return f"{sign}{m}m {s}s"
        return f"{sign}{_go_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix, value = p, value * 1000
    return f"{_go_g4(value)}{prefix}s"


def humanize_percentage(value: float) -> str:
    """Prometheus' ``humanizePercentage`` template function (0.02 -> '2%')."""
    return f"{_go_g4(value * 100)}%"


def context(cfg: Config, job: str = DEFAULT_JOB) -> dict[str, Any]:
    """Every value the templates may use, derived from the config in one place.

    ``hold`` holds each alert's ``for:`` in seconds; the reasoning for each is in the template
    comment next to the alert and in docs/runbook.md.
    """
    probe, failover, thresholds = cfg.probe, cfg.failover, cfg.thresholds
    rebalance = cfg.balancing.rebalance
    detection = probe.interval * probe.failure_threshold
    # the longest an automatic failover may leave a duty without a holder: detection, then the
    # move's hard deadline (none when nothing moves duties automatically)
    automatic = failover.enabled and not failover.dry_run
    repair = detection + (failover.deadline if automatic else 0.0)
    hold = {
        "master_down": _whole(detection),
        "master_degraded": max(120, _whole(12 * probe.interval)),
        "recovery_timeout": _whole(probe.interval),
        "latency": 300,
        "queue_warning": 300,
        "queue_critical": 120,
        "no_backup": max(60, _whole(2 * failover.recovery_timeout)),
        "no_master": _whole(detection),
        "failover_stuck": _whole(2 * failover.deadline),
        # plus one probe interval to see the new holder's answer
        "duty": _whole(repair + probe.interval),
        "imbalance": max(300, _whole(10 * rebalance.for_)),
        "exporter_down": 60,
        "exporter_absent": 300,
        "reload": 60,
    }
    budget = round(1 - thresholds.slo_availability, 12)
    return {
        "job": job,
        "sel": f'job="{job}"',
        "runbook": RUNBOOK_URL,
        "hold": hold,
        "probe_interval": probe.interval,
        "failure_threshold": probe.failure_threshold,
        "recovery_timeout": failover.recovery_timeout,
        "max_recovery_attempts": failover.max_recovery_attempts,
        "failover_deadline": failover.deadline,
        "failover_automatic": automatic,
        # rate() over at least 10 probes, and never under the usual 5m
        "latency_window": max(300, _whole(10 * probe.interval)),
        "latency_quantile": 0.99,
        "latency_warning": thresholds.probe_latency_warning,
        "event_window": 300,
        "queue_warning": thresholds.queue_warning,
        "queue_critical": thresholds.queue_critical,
        # quality is 100 for perfectly even load; imbalance_ratio r ~ quality 100/r
        "imbalance_ratio": rebalance.imbalance_ratio,
        "quality_threshold": round(100 / rebalance.imbalance_ratio, 4),
        "rebalance_for": rebalance.for_,
        "slo": thresholds.slo_availability,
        "budget": budget,
        "slo_windows": SLO_WINDOWS,
        "burns": [
            {"long": lw, "short": sw, "factor": k, "severity": sev, "for": f,
             "for_s": parse_duration(f)}
            for lw, sw, k, sev, f in BURN_RATES
        ],
        "step": TEST_STEP_SECONDS,
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # YAML and PromQL, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        variable_start_string="[[",
        variable_end_string="]]",
        block_start_string="[%",
        block_end_string="%]",
        comment_start_string="[#",
        comment_end_string="#]",
    )
    env.filters.update(
        num=num,
        dur=dur,
        window=window,
        humanize=humanize,
        humanize_duration=humanize_duration,
        humanize_percentage=humanize_percentage,
    )
    env.globals["steps"] = lambda seconds: math.ceil(seconds / TEST_STEP_SECONDS - 1e-9)
    return env


def template_names() -> list[str]:
    """Templates to render, relative to TEMPLATE_DIR; names starting with '_' are partials."""
    return sorted(
        p.relative_to(TEMPLATE_DIR).as_posix()
        for p in TEMPLATE_DIR.rglob("*.yml.j2")
        if not p.name.startswith("_")
    )


def render_texts(cfg: Config, job: str = DEFAULT_JOB) -> dict[str, str]:
    """Rendered files as {relative path: text}, without touching the disk (for drift checks)."""
    env = _environment()
    ctx = context(cfg, job)
    out: dict[str, str] = {}
    for name in template_names():
        text = env.get_template(name).render(ctx)
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as exc:  # a template bug: fail here, not in Prometheus
            raise ValueError(f"template {name} rendered invalid YAML: {exc}") from exc
        out[name.removesuffix(".j2")] = text
    return out


def render(cfg: Config, out_dir: Path, job: str = DEFAULT_JOB) -> list[Path]:
    """Write the rule files and their unit tests into ``out_dir``; return the paths written."""
    written = []
    for rel, text in render_texts(cfg, job).items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
