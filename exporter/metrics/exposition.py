"""The exposition's number and label syntax, shared by every renderer of /metrics.

Prometheus drops a whole scrape it cannot parse, so every value goes through these helpers:
label values are escaped, numbers are written finite or NaN, and huge integers become floats
rather than literals Prometheus refuses.
"""

from __future__ import annotations

import math

from prometheus_client.openmetrics import exposition as om_exposition

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic format
OM_CONTENT_TYPE = om_exposition.CONTENT_TYPE_LATEST
#: A failing metric is logged at most once per this many seconds.
THROTTLE_SECONDS = 300.0
#: Integers up to this are written exactly; larger ones as floats (float64 is what is stored).
EXACT = 2**53


def escape(value: str) -> str:
    """Label-value escaping shared by both formats."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def fmt(value: float) -> str:
    """A number in the exposition's float syntax; a huge integer becomes a float (never a
    400-digit literal, which Prometheus refuses)."""
    if type(value) is int:  # the common case first: counts
        if -EXACT <= value <= EXACT:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            value = math.inf if value > 0 else -math.inf
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def finite(value: object) -> float:
    """A sample value, finite or NaN. Raises ValueError for infinities, numbers beyond
    float64 and non-numbers (bools are numbers here: 0/1 gauges), so that the caller logs the
    bug and writes NaN."""
    if not isinstance(value, int | float):
        raise ValueError(f"not a number: {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("beyond float64") from None
    if number in (math.inf, -math.inf):
        raise ValueError(f"not finite: {number}")
    return number


def sample_value(value: object) -> str:
    """``finite(value)`` as exposition text; integers in float64's exact range as they are."""
    if type(value) is int and -EXACT <= value <= EXACT:
        return str(value)
    number = finite(value)
    return "NaN" if number != number else repr(number)
