"""Configuration: YAML in, validated models out, every error named by its key path.

Validation is pydantic's; this module adds what operators of Prometheus-family tools expect:
Prometheus-style durations, percentages, unknown keys as errors, duplicate YAML keys as errors,
YAML merge keys (``<<: *defaults``) for fleets of similar masters, and messages of the form
``masters[2].url: ...``.

What loads also runs: values that would fail only later (nan or huge numbers, zero timeouts,
busy-loop intervals, unusable URLs, hook templates that do not compile, two masters on one
URL) are refused here, so that check-config, a reload and a start agree. Whatever the input,
loading returns a Config or raises ConfigError: the file's size, its nesting and what its YAML
aliases expand to are bounded before anything is built from it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

#: Largest config file read, in bytes. A 10,000-master fleet written one master per line is
#: about 1.3 MB; a file this size made of tiny values takes libyaml about 12 s to parse, the
#: most a check-config or a reload may cost.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Deepest nesting of YAML collections (a config needs 4: masters[0].failover_regions[0]).
MAX_DEPTH = 32
#: Most YAML nodes a document may stand for once its aliases are expanded: validation walks
#: the expanded tree, where a few aliases of aliases could stand for billions of values.
MAX_NODES = 1_000_000
#: Longest duration of any setting: longer is a typo, and timers misbehave near float limits.
MAX_DURATION = 7 * 86_400.0
#: Floor of the intervals and timeouts that spin or time every call out below it.
MIN_STEP = 0.1
#: Floor of probe.timeout: below it every probe times out and the whole fleet reads as failed.
MIN_PROBE_TIMEOUT = 0.01
MAX_WEIGHT = 1e6
MIN_WEIGHT = 0.001  # the smallest weight above 0: a ratio of 1e9 keeps weighted picks exact
#: Shortest API token accepted at start: a short or typed-in token can be guessed.
MIN_TOKEN_LENGTH = 16

_DURATION_RE = re.compile(
    r"^(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m(?!s))?(?:(?P<s>[0-9]+)s)?"
    r"(?:(?P<ms>[0-9]+)ms)?$"
)
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_HINT = "expected a duration such as 500ms, 5s or 1m"


def _shown(value: object, limit: int = 60) -> str:
    """``repr`` of a value for an error message, cut short: an error never quotes a
    megabyte-long value back (nor fails on an integer too long to print)."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _finite(value: int | float) -> float:
    """A YAML number as a float that timers and arithmetic can use."""
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("number too large") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number, not .nan or .inf")
    return number


def parse_duration(value: Any) -> float:
    """Prometheus-style duration ('500ms', '5s', '1m30s') to seconds; bare numbers are seconds.
    The result is always finite and not negative."""
    if isinstance(value, bool):
        raise ValueError(_DURATION_HINT)
    if isinstance(value, int | float):
        seconds = _finite(value)
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds
    if not isinstance(value, str) or not value:
        raise ValueError(_DURATION_HINT)
    match = _DURATION_RE.match(value.strip())
    if not match or not any(match.groupdict().values()):
        raise ValueError(f"invalid duration {_shown(value)}: use e.g. 500ms, 5s, 1m, 1h30m")
    try:
        seconds = sum(_UNITS[unit] * int(n) for unit, n in match.groupdict().items() if n)
    except (OverflowError, ValueError):  # more digits than a float (or int()) takes
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"duration {_shown(value)} is too large")
    return seconds


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
            raise ValueError(f"invalid percentage {_shown(value)}: use e.g. 10%")
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"invalid percentage {_shown(value)}: use e.g. 10%") from None
    elif isinstance(value, int | float):
        fraction = _finite(value)
        if fraction > 1:
            fraction /= 100  # 50 means 50%
    else:
        raise ValueError("expected a percentage such as 10%")
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError("must be between 0% and 100%")
    return fraction


def _duration(low: float = 0.0, high: float = MAX_DURATION) -> BeforeValidator:
    """Validator of a duration field: parsed, then held to [low, high] seconds."""

    def check(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < low:
            raise ValueError(f"must be at least {format_duration(low)}")
        if seconds > high:
            raise ValueError(f"must be at most {format_duration(high)}")
        return seconds

    return BeforeValidator(check)


def _number(value: Any) -> Any:
    """A float field's input: finite, and never a YAML boolean. Other types go on to
    pydantic, which names the wrong type."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, int | float):
        return _finite(value)
    return value


def _check_url(value: str) -> str:
    """An http(s) URL a client can connect to: a host, a port in 1..65535, no spaces or
    control characters (each of which would fail every request, not the load)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{_shown(value)} contains a space or a control character")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{_shown(value)} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{_shown(value)} is not an http(s) URL")
    if port == 0:
        raise ValueError(f"{_shown(value)}: the port must be 1 to 65535")
    return value


def _check_host(value: str) -> str:
    """A host to bind: not empty, no spaces or control characters (bind fails on them)."""
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{_shown(value)} is not a host name or address")
    return value


def _check_label(value: str) -> str:
    """A name or region: shown in metrics labels, logs, URLs of the API and the status page,
    where a control character would forge or break a line."""
    if not value.isprintable():
        raise ValueError(f"{_shown(value)} contains a control or non-printable character")
    return value


def _check_path(value: str) -> str:
    """A file path the OS accepts (sqlite and open() fail on an empty one or a NUL byte)."""
    if not value or "\0" in value:
        raise ValueError("must be a non-empty file path without NUL bytes")
    return value


_TEMPLATES = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def _check_template(source: str) -> str:
    """Compile a hook body as exporter.failover.hooks renders it (the same sandbox), so that a
    syntax error is refused at load rather than vetoing a failover later."""
    try:
        _TEMPLATES.from_string(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template error at line {exc.lineno}: {exc.message}") from None
    except RecursionError:
        raise ValueError("template error: nested too deeply") from None
    except (TemplateError, SyntaxError, ValueError, OverflowError) as exc:
        raise ValueError(f"template error: {exc}") from None
    return source


Duration = Annotated[float, _duration()]
Fraction = Annotated[float, BeforeValidator(parse_fraction)]
Number = Annotated[float, BeforeValidator(_number)]
HttpUrl = Annotated[str, AfterValidator(_check_url)]
FilePath = Annotated[str, AfterValidator(_check_path)]
Label = Annotated[str, AfterValidator(_check_label)]


class _Strict(BaseModel):
    """Base of every config model: unknown keys are errors, and values are never converted
    across types (``port: 80.0``, ``port: "80"``, ``enabled: 1`` are errors, not guesses)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ListenConfig(_Strict):
    host: Annotated[str, AfterValidator(_check_host)] = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)  # 0: any free port (tests, the demo)


class ProbeConfig(_Strict):
    """How masters are probed. ``max_body_bytes`` caps a /health answer (bytes; default 64 KiB,
    16 MiB at most): a master streaming an endless or huge body costs the exporter no more than
    this, and a larger answer counts as ``invalid_response``."""

    # Defaults detect a dead master in under 5 s: threshold x interval x (1 + jitter) + timeout
    # + 2 ticks = 3 x 1.1 s + 0.75 s + 0.02 s = 4.07 s at worst (docs/benchmarks.md, Detection).
    interval: Duration = 1.0
    timeout: Duration = 0.75
    path: str = "/health"
    failure_threshold: int = Field(default=3, ge=1, le=100)
    recovery_threshold: int = Field(default=2, ge=1, le=100)
    degraded_latency: Duration = 0.5
    jitter: Fraction = 0.1
    # One keep-alive connection per master up to this many (bounded by the open-files limit).
    max_connections: int = Field(default=16_384, ge=1, le=65535)
    max_body_bytes: int = Field(default=65_536, ge=1024, le=16_777_216)

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> ProbeConfig:
        if self.interval < MIN_STEP:
            raise ValueError(f"interval: must be at least {format_duration(MIN_STEP)}")
        if self.timeout <= 0 or self.timeout >= self.interval:
            raise ValueError("timeout: must be greater than 0 and less than probe.interval")
        if self.timeout < MIN_PROBE_TIMEOUT:
            raise ValueError(f"timeout: must be at least {format_duration(MIN_PROBE_TIMEOUT)}")
        return self


class MasterConfig(_Strict):
    name: Label = Field(min_length=1, max_length=200)
    url: HttpUrl
    priority: int = Field(default=100, ge=0, le=1_000_000)
    region: Label = "default"
    role: Literal["active", "standby"] = "active"
    weight: Number = Field(default=1.0, ge=0, le=MAX_WEIGHT)  # 0: never routed to
    failover: Literal["allow", "never"] = "allow"
    failover_regions: list[Label] = []  # regions allowed to back this master up; [] = any
    shared_url: bool = False  # this master's URL may be listed for other masters too

    @field_validator("url")
    @classmethod
    def _url_base(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("weight")
    @classmethod
    def _weight_zero_or_usable(cls, v: float) -> float:
        if 0 < v < MIN_WEIGHT:
            raise ValueError(f"must be 0 (no traffic) or at least {MIN_WEIGHT:g}")
        return v


#: A duration of at least MIN_STEP: the loops and timeouts that misbehave below it.
StepDuration = Annotated[float, _duration(MIN_STEP)]


def _duration_or_none(value: Any) -> float | None:
    """A duration of at least ``MIN_STEP``, or ``none`` (YAML null or the word) for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    seconds = parse_duration(value)
    if seconds < MIN_STEP:
        raise ValueError(f"must be at least {format_duration(MIN_STEP)} (or none)")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)} (or none)")
    return seconds


class RebalanceConfig(_Strict):
    imbalance_ratio: Number = Field(default=2.0, gt=1.0, le=1000.0)
    for_: Duration = Field(default=30.0, alias="for")
    step: Fraction = 0.25
    min_weight_factor: Fraction = 0.1


Strategy = Literal["round_robin", "priority", "least_loaded", "geo", "consistent_hash"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class BalancingConfig(_Strict):
    model_config = ConfigDict(populate_by_name=True)
    strategy: Strategy = "round_robin"
    panic_threshold: Fraction = 0.5
    rebalance: RebalanceConfig = RebalanceConfig()
    region_fallback: list[Label] = []
    degraded_weight: Fraction = 0.5
    slow_start: Duration = 30.0
    outlier_consecutive_failures: int = Field(default=5, ge=1, le=10_000)
    max_ejection_percent: Fraction = 0.5
    saturation_queue: int = Field(default=1000, ge=1, le=1_000_000_000)


class FailoverConfig(_Strict):
    enabled: bool = True
    cooldown: Duration = 60.0
    fleet_cooldown: Duration = 0.0
    dry_run: bool = False
    checkpoint_interval: StepDuration = 10.0
    recovery_timeout: Duration = 30.0
    max_recovery_attempts: int = Field(default=5, ge=1, le=1000)
    failback: Literal["manual", "auto"] = "manual"
    deadline: StepDuration = 30.0
    step_timeout: StepDuration = 5.0
    max_candidates: int = Field(default=3, ge=1, le=1000)
    max_concurrent: int = Field(default=2, ge=1, le=1000)
    # the biggest GET /state read from a master (bytes): a larger or endless snapshot fails
    # the read instead of exhausting the exporter's memory
    max_state_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=1024 * 1024 * 1024)
    # a backup is activated without state only when this is false (or an operator overrides
    # it): a stateless takeover drops every session and pending message of the duty
    require_state: bool = True
    # a checkpoint older than this is not moved (``none``: any age); then require_state decides
    max_checkpoint_age: Annotated[float | None, BeforeValidator(_duration_or_none)] = 300.0
    pre_hook: HookConfig | None = None
    post_hook: HookConfig | None = None


class HookConfig(_Strict):
    url: HttpUrl
    # jinja2 template rendering the JSON body, compiled here so a syntax error fails the load
    body: Annotated[str, AfterValidator(_check_template)] | None = None
    timeout: StepDuration = 5.0


class ThresholdsConfig(_Strict):
    queue_warning: int = Field(default=100, ge=0, le=1_000_000_000)
    queue_critical: int = Field(default=500, ge=0, le=1_000_000_000)
    probe_latency_warning: Duration = 1.0
    slo_availability: Fraction = 0.999

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdsConfig:
        if self.queue_critical < self.queue_warning:
            raise ValueError("queue_critical: must be at least queue_warning")
        return self


class AlertmanagerConfig(_Strict):
    url: HttpUrl


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(f"{_shown(value)} is not an environment variable name")
    return value


class ApiConfig(_Strict):
    token_env: Annotated[str, AfterValidator(_check_env_name)] | None = "HA_EXPORTER_TOKEN"
    token_file: FilePath | None = None
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1024 * 1024)


def _check_endpoint(value: str) -> str:
    """An etcd endpoint: an http(s) URL, or ``unix:///absolute/path`` of etcd's socket."""
    if value.startswith("unix://"):
        path = value[len("unix://"):]
        if not path.startswith("/") or len(path.encode()) > 107:
            raise ValueError(f"{_shown(value)}: a unix endpoint is unix:///absolute/path "
                             "(at most 107 bytes)")
        return value
    return _check_url(value)


_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._-]+)+$")


def _check_prefix(value: str) -> str:
    if not _PREFIX_RE.match(value) or len(value) > 200:
        raise ValueError(f"{_shown(value)} is not a key prefix like /ha-exporter/prod "
                         "(slash-separated letters, digits, '.', '_', '-')")
    return value


class EtcdConfig(_Strict):
    endpoints: list[Annotated[str, AfterValidator(_check_endpoint)]] = Field(
        min_length=1, max_length=16)
    prefix: Annotated[str, AfterValidator(_check_prefix)] = "/ha-exporter"
    timeout: StepDuration = 2.0


class ClusterConfig(_Strict):
    """Several replicas on etcd: one leader acts, every member probes its share."""

    etcd: EtcdConfig
    member: Label | None = None  # unique per replica; None: host:port of the listener
    url: HttpUrl | None = None  # where the other replicas reach this one's API; None: listener
    lease_ttl: Annotated[float, _duration(2.0)] = 10.0
    observers: int = Field(default=2, ge=1, le=15)
    quorum: int = Field(default=2, ge=1, le=15)

    @model_validator(mode="after")
    def _quorum_within_observers(self) -> ClusterConfig:
        if self.quorum > self.observers:
            raise ValueError(f"quorum: {self.quorum} is more than observers ({self.observers});"
                             " a master could never be failed")
        return self


def _url_identity(url: str) -> str:
    """What makes two master URLs the same server: scheme, host in any case, port (written or
    the default one), path and query."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}?{parts.query}"


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    state_path: FilePath = "./ha-exporter.db"
    probe: ProbeConfig = ProbeConfig()
    masters: list[MasterConfig] = Field(min_length=1)
    balancing: BalancingConfig = BalancingConfig()
    failover: FailoverConfig = FailoverConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    alertmanager: AlertmanagerConfig | None = None
    api: ApiConfig = ApiConfig()
    cluster: ClusterConfig | None = None  # None: a single node on its SQLite file

    @model_validator(mode="after")
    def _unique_masters(self) -> Config:
        """A name identifies a master everywhere (metrics, API, state). Two masters on one URL
        are one server probed, routed to and failed over as two, so that takes shared_url on
        both."""
        errors: list[tuple[str, str]] = []
        names: dict[str, int] = {}
        urls: dict[str, int] = {}
        for i, m in enumerate(self.masters):
            first = names.setdefault(m.name, i)
            if first != i:
                errors.append((f"masters[{i}].name",
                               f"duplicate master name {m.name!r} (first at masters[{first}])"))
            first = urls.setdefault(_url_identity(m.url), i)
            other = self.masters[first]
            if first != i and not (m.shared_url and other.shared_url):
                errors.append((
                    f"masters[{i}].url",
                    f"master {m.name!r} has the same URL as masters[{first}] {other.name!r} "
                    f"({_shown(m.url)}); if they share it on purpose, set shared_url: true "
                    "on both",
                ))
        if errors:
            raise _KeyedError(errors)
        return self

    def master(self, name: str) -> MasterConfig | None:
        return next((m for m in self.masters if m.name == name), None)


FailoverConfig.model_rebuild()


class _KeyedError(ValueError):
    """Model-level errors that know which keys they belong to."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))
        self.errors = errors


def _printable(text: str) -> str:
    """One terminal-safe line: a key or value quoted in an error may hold newlines or escape
    sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(Exception):
    """Every problem found in a config, each as 'key.path: message' on a line of its own."""

    def __init__(self, errors: list[str]) -> None:
        errors = [_printable(e) for e in errors]
        super().__init__("\n".join(errors))
        self.errors = errors


_MERGE_TAG = "tag:yaml.org,2002:merge"
#: Longest integer read: enough for any number a setting takes and more (a 400-digit integer
#: still reaches validation, which names its key), well below what int() refuses (4,300).
_MAX_INT_DIGITS = 1000


class _ConfigConstructor(SafeConstructor):
    """SafeConstructor that refuses duplicate mapping keys instead of keeping the last, and applies
    YAML 1.1 merge keys (``<<: *defaults``, ``<<: [*a, *b]``): a mapping's own keys override
    merged ones, and of several merged mappings the earlier one wins a shared key.

    It checks the composed document's size before building anything (``_check_size``), and a
    value Python cannot hold (the date 2001-13-45, an integer of 5,000 digits) is a YAML error
    at its line rather than an exception from deep inside PyYAML."""

    if TYPE_CHECKING:  # provided by the parser half of each loader

        def get_single_node(self) -> Node | None: ...

        def dispose(self) -> None: ...

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return self.construct_document(node)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's own constructors fail on e.g. !!timestamp x
            what = _shown(node.value) if isinstance(node, ScalarNode) else "this value"
            why = f": {exc}" if isinstance(exc, ValueError | OverflowError) else ""
            raise ConstructorError(
                None, None, f"cannot read {what} as {node.tag.rsplit(':', 1)[-1]}{why}",
                node.start_mark,
            ) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        digits = sum(c.isalnum() for c in node.value)
        if digits > _MAX_INT_DIGITS:
            raise ConstructorError(
                None, None, f"an integer of {digits} digits is too large", node.start_mark
            )
        return super().construct_yaml_int(node)

    yaml_constructors = {
        **SafeConstructor.yaml_constructors, "tag:yaml.org,2002:int": construct_yaml_int
    }

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
            try:
                hash(key)
            except TypeError:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found an unhashable key", key_node.start_mark,
                ) from None
            if key in own:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {_shown(key)}", key_node.start_mark,
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


def _check_size(root: Node) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, or standing for more than MAX_NODES
    nodes once its aliases are expanded, before anything is built from it. Validation walks
    the expanded tree, where aliases of aliases can stand for billions of values; here each
    distinct node is visited once, with its expanded size and depth remembered, and an alias
    inside its own anchor (``&a [*a]``) is refused."""
    measured: dict[int, tuple[int, int]] = {}  # id(node): (nodes below it, expanded; depth)
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, ScalarNode):
            continue
        children: list[Node] = (
            [child for pair in node.value for child in pair]
            if isinstance(node, MappingNode)
            else list(node.value)
        )
        if children_done:
            open_.discard(id(node))
            size, depth = 0, 1
            for child in children:
                below, child_depth = measured.get(id(child), (0, 0))
                size += 1 + below
                depth = max(depth, child_depth + 1)
            if depth > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark
                )
            if size > MAX_NODES:
                raise ComposerError(
                    None, None, f"more than {MAX_NODES:,} values once aliases are expanded",
                    node.start_mark,
                )
            measured[id(node)] = (size, depth)
        elif id(node) in open_:
            raise ComposerError(
                None, None, "an alias refers to the collection it is in", node.start_mark
            )
        elif id(node) not in measured:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)


class _PureLoader(Reader, Scanner, Parser, Composer, _ConfigConstructor, Resolver):
    """The loader without libyaml. PyYAML's composer recurses once per nesting level, so
    the depth is capped while composing (10,000 nested brackets would exhaust the stack)."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _ConfigConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:  # the root is level 1; its scalars compose at 2
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _pick_loader() -> Callable[[str], _ConfigConstructor]:
    """libyaml's parser (about five times faster) where it refuses deep nesting itself, as
    libyaml >= 0.2.5 does at 1,000 levels: its composer recurses in C, below Python's
    recursion limit. Elsewhere, the pure-Python loader."""
    try:
        from yaml._yaml import CParser
    except ImportError:
        return _PureLoader

    class _FastLoader(CParser, _ConfigConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _ConfigConstructor.__init__(self)
            Resolver.__init__(self)

    probe = _FastLoader("[" * 2000 + "]" * 2000)
    try:
        probe.get_single_node()
    except yaml.YAMLError:
        return _FastLoader
    finally:
        probe.dispose()
    return _PureLoader


_LOADER = _pick_loader()


def _key_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
}


def _yaml_kind(value: Any) -> str:
    """What a YAML value is, in the words of a YAML author."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "-.inf" if value < 0 else ".inf" if value > 0 else ".nan"
    if isinstance(value, int | float):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the string {_shown(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {_shown(value)}"


def _format_errors(exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]  # drop union tags
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _KeyedError):
            out.extend(f"{path}: {message}" for path, message in ctx_error.errors)
            continue
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "invalid_key":  # loc ends with the key, which may be True or 1
            loc = loc[:-1]
            msg = f"key {_yaml_kind(err['input'])} is not a string"
        elif err["type"] in _EXPECTED:
            msg = f"{_EXPECTED[err['type']]}, got {_yaml_kind(err['input'])}"
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
        raise ConfigError([f"(top level): expected a mapping of keys, got {_yaml_kind(data)}"])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file: UTF-8, at most MAX_CONFIG_BYTES."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {p}: {exc.strerror or exc}"]) from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError([f"(file): cannot read {_shown(str(p))}: {exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(file): {p} is larger than {MAX_CONFIG_BYTES // 2**20} MiB, "
                           "the most a config may be"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"(file): not UTF-8: byte 0x{raw[exc.start]:02x} on line {line} "
                           f"(offset {exc.start}); save the file as UTF-8"]) from None
    return load_config_text(text)


def _yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: where it is, then what."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "cannot parse"
        if exc.context and problem.startswith("but "):  # "expected X, but found Y"
            problem = f"{exc.context}, {problem}"
        if mark is not None:
            return f"(yaml line {mark.line + 1}, column {mark.column + 1}): {problem}"
        return f"(yaml): {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        at = min(max(int(exc.position), 0), len(text))
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        return f"(yaml line {line}, column {column}): {exc.reason}"
    return f"(yaml): {exc}"


def load_config_text(text: str) -> Config:
    """Parse and validate config text; raise ConfigError naming the key or line of each
    problem."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(file): larger than {MAX_CONFIG_BYTES // 2**20} MiB, "
                           "the most a config may be"])
    try:
        loader = _LOADER(text)  # PyYAML's reader checks every character here
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, text)]) from None
    except RecursionError:
        raise ConfigError([f"(yaml): nested deeper than {MAX_DEPTH} levels"]) from None
    return parse_config(data)


def read_token(api: ApiConfig) -> str | None:
    """The bearer token from the environment or a file, never from the YAML itself. None when
    neither holds one (empty or only whitespace): the caller refuses to start unless told to
    run without authentication. A token shorter than MIN_TOKEN_LENGTH is an error, whatever
    the caller's flags: it can be guessed. Errors name the source and the length, never the
    token."""
    if api.token_file:
        source = f"api.token_file: {api.token_file}"
        try:
            raw: str | None = Path(api.token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
        except (UnicodeDecodeError, ValueError):
            raise ConfigError([f"{source}: not a UTF-8 text file"]) from None
    elif api.token_env:
        source = f"api.token_env: ${api.token_env}"
        raw = os.environ.get(api.token_env)
    else:
        return None
    token = (raw or "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError([
            f"{source}: the API token is {len(token)} characters long, it must be at least "
            f"{MIN_TOKEN_LENGTH} (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        ])
    return token


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
