"""/metrics: fleet-level metrics through prometheus_client, per-master and duty families
rendered direct, streamed in pieces.

``registry`` assembles a scrape and streams it; ``masters`` writes the per-master families
from a snapshot of the fleet's records (``snapshot``); ``duties`` the duty families from what
the masters report; ``collectors`` holds the isolated prometheus_client collectors (the probe
engine's lateness among them); ``exposition`` the number and label syntax.

One bad value never breaks a scrape: Prometheus drops a whole scrape it cannot parse, and a 500
loses every series at once. So every value is written finite or NaN, each per-master sample and
each gauge callback is computed on its own (a failure gives NaN or drops that sample), every
collector of the registry is isolated, and the failure is logged once per metric per
``THROTTLE_SECONDS``, not on every scrape. A streamed scrape never fails half-way for the same
reason: whatever fails is left out, so the pieces written so far stay a valid exposition.
"""

from exporter.metrics.collectors import (
    PROBE_ENGINE_FAMILIES,
    CallbackGauge,
    MappingCounter,
    ProbeEngineCollector,
)
from exporter.metrics.duties import (
    DUTY_FAMILIES,
    DutyState,
    DutyStatus,
    duty_status,
    health_score,
    iter_duties,
    render_duties,
)
from exporter.metrics.exposition import (
    OM_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    THROTTLE_SECONDS,
    escape,
    finite,
    fmt,
    sample_value,
)
from exporter.metrics.masters import FleetCollector
from exporter.metrics.registry import (
    HEALTH_SCORE_HELP,
    OWNED_COUNTERS,
    ExporterMetrics,
    content_type,
    wants_openmetrics,
)

__all__ = [
    "DUTY_FAMILIES", "HEALTH_SCORE_HELP", "OM_CONTENT_TYPE", "OWNED_COUNTERS",
    "PROBE_ENGINE_FAMILIES", "TEXT_CONTENT_TYPE", "THROTTLE_SECONDS", "CallbackGauge",
    "DutyState", "DutyStatus", "ExporterMetrics", "FleetCollector", "MappingCounter",
    "ProbeEngineCollector", "content_type", "duty_status", "escape", "finite", "fmt",
    "health_score", "iter_duties", "render_duties", "sample_value", "wants_openmetrics",
]
