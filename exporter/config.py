"""Configuration: YAML in, validated models out, every error named by its key path.

Validation is pydantic's; this module adds what operators of Prometheus-family tools expect:
Prometheus-style durations, percentages, unknown keys as errors, duplicate YAML keys as errors,
YAML merge keys (``<<: *defaults``) for fleets of similar masters, and messages of the form
``masters[2].url: ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

_DURATION_RE = re.compile(
    r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?$"
)
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: Any) -> float:
    """Prometheus-style duration ('500ms', '5s', '1m30s') to seconds; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s or 1m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError("expected a duration such as 500ms, 5s or 1m")
    match = _DURATION_RE.match(value.strip())
    if not match or not any(match.groupdict().values()):
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 5s, 1m, 1h30m")
    return sum(_UNITS[unit] * int(n) for unit, n in match.groupdict().items() if n)


def format_duration(seconds: float) -> str:
    """Seconds back to the shortest Prometheus duration string (for rendered rules)."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def parse_fraction(value: Any) -> float:
    """'10%' or 0.1 to 0.1, for jitter and thresholds written either way."""
    if isinstance(value, bool):
        raise ValueError("expected a percentage such as 10%")
    fraction: float
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"invalid percentage {value!r}: use e.g. 10%")
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"invalid percentage {value!r}: use e.g. 10%") from None
    elif isinstance(value, int | float):
        fraction = float(value)
        if fraction > 1:
            fraction /= 100  # 50 means 50%
    else:
        raise ValueError("expected a percentage such as 10%")
    if not 0 <= fraction <= 1:
        raise ValueError("must be between 0% and 100%")
    return fraction


Duration = Annotated[float, BeforeValidator(parse_duration)]
Fraction = Annotated[float, BeforeValidator(parse_fraction)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class ProbeConfig(_Strict):
    interval: Duration = 5.0
    timeout: Duration = 2.0
    path: str = "/health"
    failure_threshold: int = Field(default=3, ge=1, le=100)
    recovery_threshold: int = Field(default=2, ge=1, le=100)
    degraded_latency: Duration = 0.5
    jitter: Fraction = 0.1
    max_connections: int = Field(default=256, ge=1, le=65535)

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> ProbeConfig:
        if self.interval <= 0:
            raise ValueError("interval: must be greater than 0")
        if self.timeout <= 0 or self.timeout >= self.interval:
            raise ValueError("timeout: must be greater than 0 and less than probe.interval")
        return self


class MasterConfig(_Strict):
    name: str = Field(min_length=1, max_length=200)
    url: str
    priority: int = Field(default=100, ge=0)
    region: str = "default"
    role: Literal["active", "standby"] = "active"
    weight: float = Field(default=1.0, ge=0)
    failover: Literal["allow", "never"] = "allow"
    failover_regions: list[str] = []  # regions allowed to back this master up; [] = any

    @field_validator("url")
    @classmethod
    def _url_http(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class RebalanceConfig(_Strict):
    imbalance_ratio: float = Field(default=2.0, gt=1.0)
    for_: Duration = Field(default=30.0, alias="for")
    step: Fraction = 0.25
    min_weight_factor: Fraction = 0.1


Strategy = Literal["round_robin", "priority", "least_loaded", "geo", "consistent_hash"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class BalancingConfig(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    strategy: Strategy = "round_robin"
    panic_threshold: Fraction = 0.5
    rebalance: RebalanceConfig = RebalanceConfig()
    region_fallback: list[str] = []
    degraded_weight: Fraction = 0.5
    slow_start: Duration = 30.0
    outlier_consecutive_failures: int = Field(default=5, ge=1)
    max_ejection_percent: Fraction = 0.5
    saturation_queue: int = Field(default=1000, ge=1)


class FailoverConfig(_Strict):
    enabled: bool = True
    cooldown: Duration = 60.0
    fleet_cooldown: Duration = 0.0
    dry_run: bool = False
    checkpoint_interval: Duration = 10.0
    recovery_timeout: Duration = 30.0
    max_recovery_attempts: int = Field(default=5, ge=1)
    failback: Literal["manual", "auto"] = "manual"
    deadline: Duration = 30.0
    step_timeout: Duration = 5.0
    max_candidates: int = Field(default=3, ge=1)
    max_concurrent: int = Field(default=2, ge=1)
    pre_hook: HookConfig | None = None
    post_hook: HookConfig | None = None


class HookConfig(_Strict):
    url: str
    body: str | None = None  # jinja2 template rendering the JSON body
    timeout: Duration = 5.0


class ThresholdsConfig(_Strict):
    queue_warning: int = Field(default=100, ge=0)
    queue_critical: int = Field(default=500, ge=0)
    probe_latency_warning: Duration = 1.0
    slo_availability: Fraction = 0.999

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdsConfig:
        if self.queue_critical < self.queue_warning:
            raise ValueError("queue_critical: must be at least queue_warning")
        return self


class AlertmanagerConfig(_Strict):
    url: str


class ApiConfig(_Strict):
    token_env: str | None = "HA_EXPORTER_TOKEN"
    token_file: str | None = None
    max_body_bytes: int = Field(default=1_048_576, ge=1024)


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    state_path: str = "./ha-exporter.db"
    probe: ProbeConfig = ProbeConfig()
    masters: list[MasterConfig] = Field(min_length=1)
    balancing: BalancingConfig = BalancingConfig()
    failover: FailoverConfig = FailoverConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    alertmanager: AlertmanagerConfig | None = None
    api: ApiConfig = ApiConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.masters):
            if m.name in seen:
                raise _KeyedError(
                    f"masters[{i}].name",
                    f"duplicate master name {m.name!r} (first at masters[{seen[m.name]}])",
                )
            seen[m.name] = i
        return self

    def master(self, name: str) -> MasterConfig | None:
        return next((m for m in self.masters if m.name == name), None)


FailoverConfig.model_rebuild()


class _KeyedError(ValueError):
    """A model-level error that knows which key it belongs to."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class ConfigError(Exception):
    """Every problem found in a config, each as 'key.path: message'."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last, and applies
    YAML 1.1 merge keys (``<<: *defaults``, ``<<: [*a, *b]``): a mapping's own keys override
    merged ones, and of several merged mappings the earlier one wins a shared key."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if not isinstance(node, MappingNode):
            raise ConstructorError(
                None, None, f"expected a mapping, but found {node.id}", node.start_mark
            )
        merged: dict[Hashable, Any] = {}
        own: dict[Hashable, Any] = {}
        merge_seen = False
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                if merge_seen:
                    raise ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "duplicate key '<<'", key_node.start_mark,
                    )
                merge_seen = True
                for source in self._merge_sources(value_node):
                    for key, value in self.construct_mapping(source, deep=deep).items():
                        merged.setdefault(key, value)
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found an unhashable key", key_node.start_mark,
                )
            if key in own:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark,
                )
            own[key] = self.construct_object(value_node, deep=deep)
        merged.update(own)
        return merged

    @staticmethod
    def _merge_sources(value_node: Node) -> list[MappingNode]:
        """The mappings a ``<<`` value names, in precedence order (earlier wins)."""
        if isinstance(value_node, MappingNode):
            return [value_node]
        if isinstance(value_node, SequenceNode) and all(
            isinstance(item, MappingNode) for item in value_node.value
        ):
            return list(value_node.value)
        raise ConstructorError(
            None, None, "<< (merge) expects a mapping or a list of mappings, e.g. <<: *defaults",
            value_node.start_mark,
        )


def _key_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]  # drop union tags
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _KeyedError):
            out.append(f"{ctx_error.path}: {ctx_error}")
            continue
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        # model-level validators name their own field as 'field: message'
        if ":" in msg and msg.split(":", 1)[0].isidentifier() and err["type"] == "value_error":
            field, rest = msg.split(":", 1)
            loc = [*loc, field]
            msg = rest.strip()
        out.append(f"{_key_path(loc)}: {msg}")
    return out


def parse_config(data: Any) -> Config:
    """Validate already-parsed YAML; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of keys"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {p}: {exc.strerror}"]) from None
    return load_config_text(text)


def load_config_text(text: str) -> Config:
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"(yaml {where}): {problem}"]) from None
    return parse_config(data)


def read_token(api: ApiConfig) -> str | None:
    """The bearer token from the environment or a file; never from the YAML itself."""
    if api.token_file:
        try:
            token = Path(api.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [f"api.token_file: cannot read {api.token_file}: {exc.strerror}"]
            ) from None
        return token or None
    if api.token_env:
        return os.environ.get(api.token_env) or None
    return None


def summary(cfg: Config) -> str:
    regions = sorted({m.region for m in cfg.masters})
    standby = sum(m.role == "standby" for m in cfg.masters)
    return (
        f"config ok: {len(cfg.masters)} masters ({standby} standby) in {len(regions)} regions "
        f"[{', '.join(regions)}], probe every {format_duration(cfg.probe.interval)} "
        f"(timeout {format_duration(cfg.probe.timeout)}), strategy {cfg.balancing.strategy}, "
        f"failover {'on' if cfg.failover.enabled else 'off'}"
        f"{' (dry run)' if cfg.failover.dry_run else ''}"
    )
