"""/metrics: fleet-level metrics through prometheus_client, per-master and duty families
rendered direct.

``registry`` assembles a scrape; ``masters`` writes the per-master families from the fleet's
records; ``duties`` the duty families from what the masters report; ``collectors`` holds the
isolated prometheus_client collectors; ``exposition`` the number and label syntax.

One bad value never breaks a scrape: Prometheus drops a whole scrape it cannot parse, and a 500
loses every series at once. So every value is written finite or NaN, each per-master sample and
each gauge callback is computed on its own (a failure gives NaN or drops that sample), every
collector of the registry is isolated, and the failure is logged once per metric per
``THROTTLE_SECONDS``, not on every scrape.
"""

from exporter.metrics.collectors import CallbackGauge, MappingCounter
from exporter.metrics.duties import (
    DUTY_FAMILIES,
    DutyState,
    DutyStatus,
    duty_status,
    health_score,
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
from exporter.metrics.registry import HEALTH_SCORE_HELP, OWNED_COUNTERS, ExporterMetrics

__all__ = [
    "DUTY_FAMILIES", "HEALTH_SCORE_HELP", "OM_CONTENT_TYPE", "OWNED_COUNTERS", "TEXT_CONTENT_TYPE",
    "THROTTLE_SECONDS", "CallbackGauge", "DutyState", "DutyStatus", "ExporterMetrics",
    "FleetCollector", "MappingCounter", "duty_status", "escape", "finite", "fmt",
    "health_score", "render_duties", "sample_value",
]
