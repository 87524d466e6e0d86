"""Threshold-driven rebalancing: shift routing weight away from masters whose queue outgrows
their share, and give it back once they have drained.

Everything is measured in *queue per unit of base weight*, q_i = queue_length_i / weight_i,
over the masters currently in rotation whose queue length is known.

Imbalance of master i: ``q_i / max(mean of the others' q, QUEUE_FLOOR)``.
  * not max/mean: with N masters max/mean can never exceed N, so with two masters and the
    default ratio of 2.0 it would never fire, however lopsided the queues;
  * not max/min: one idle master (q = 0) makes it infinite, so it would always fire;
  * the floor (10 messages per unit of weight) keeps a handful of queued messages against an
    empty fleet from counting as imbalance.

Hysteresis, per master, with both a level and a time band:
  * over: ratio > ``imbalance_ratio`` continuously for ``for`` -> factor -= ``step`` on each
    evaluation, never below ``min_weight_factor`` (reason "imbalance");
  * calm: ratio <= ``RESTORE_FRACTION`` * ``imbalance_ratio`` continuously for ``for`` ->
    factor += ``step`` on each evaluation, up to 1 (reason "restored");
  * in between: hold, and both clocks restart.
A master out of rotation keeps its factor (it is applied again when it returns) but its clocks
restart, since it was not observed continuously.

Distribution quality (``ha_load_distribution_quality``, 0..100): Jain's fairness index J of
x_i = q_i + QUEUE_FLOOR over the same masters, rescaled so that the worst possible value for n
masters (J = 1/n: everything queued on one) reads 0 and perfect balance reads 100:
``100 * (J - 1/n) / (1 - 1/n)``. The floor stops a few stray messages on an idle fleet from
reading as unfair. Fewer than two masters, or no known queue: 100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from exporter.config import RebalanceConfig

QUEUE_FLOOR = 10.0
RESTORE_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class LoadSample:
    master: str
    queue_length: float
    weight: float  # base weight from the config (> 0)


@dataclass(frozen=True, slots=True)
class RebalanceEvent:
    """One weight shift, for the log, the audit trail and ha_rebalances_total{reason}."""

    master: str
    old_factor: float
    new_factor: float
    reason: str  # "imbalance" (weight taken) or "restored" (weight given back)
    ratio: float  # the master's imbalance ratio when it shifted


def _per_weight(samples: Sequence[LoadSample]) -> list[float]:
    return [max(0.0, s.queue_length) / s.weight for s in samples]


def imbalance_ratios(samples: Sequence[LoadSample]) -> dict[str, float]:
    """Each master's q / max(mean q of the others, QUEUE_FLOOR); empty for fewer than two."""
    n = len(samples)
    if n < 2:
        return {}
    q = _per_weight(samples)
    total = math.fsum(q)
    return {
        s.master: qi / max((total - qi) / (n - 1), QUEUE_FLOOR)
        for s, qi in zip(samples, q, strict=True)
    }


def distribution_quality(samples: Sequence[LoadSample]) -> float:
    """0..100, normalised Jain's fairness of queue per weight (see the module docstring)."""
    n = len(samples)
    if n < 2:
        return 100.0
    x = [qi + QUEUE_FLOOR for qi in _per_weight(samples)]
    jain = math.fsum(x) ** 2 / (n * math.fsum(v * v for v in x))
    return max(0.0, min(100.0, 100.0 * (jain - 1.0 / n) / (1.0 - 1.0 / n)))


class Rebalancer:
    """Holds a weight factor (min_weight_factor..1) per master and moves it by the rules above.

    Pure: the caller passes the time and the samples, so it is testable with a fake clock."""

    def __init__(self, config: RebalanceConfig) -> None:
        self.config = config
        self._factors: dict[str, float] = {}
        self._over_since: dict[str, float] = {}
        self._calm_since: dict[str, float] = {}

    def configure(self, config: RebalanceConfig) -> None:
        """Reload: new thresholds apply from the next evaluation; factors are clamped to them."""
        self.config = config
        for name, factor in self._factors.items():
            self._factors[name] = max(config.min_weight_factor, factor)

    def factor(self, name: str) -> float:
        return self._factors.get(name, 1.0)

    def factors(self) -> dict[str, float]:
        """Masters whose weight is currently reduced (factor < 1)."""
        return dict(self._factors)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of masters no longer configured."""
        keep = set(keep)
        for d in (self._factors, self._over_since, self._calm_since):
            for name in [n for n in d if n not in keep]:
                del d[name]

    def evaluate(self, now: float, samples: Sequence[LoadSample]) -> list[RebalanceEvent]:
        """One evaluation round; returns the shifts it made (empty most of the time)."""
        cfg = self.config
        ratios = imbalance_ratios(samples)
        for d in (self._over_since, self._calm_since):
            for name in [n for n in d if n not in ratios]:
                del d[name]
        events: list[RebalanceEvent] = []
        for name, ratio in ratios.items():
            old = self._factors.get(name, 1.0)
            new, reason = old, ""
            if ratio > cfg.imbalance_ratio:
                self._calm_since.pop(name, None)
                since = self._over_since.setdefault(name, now)
                if now - since >= cfg.for_ and old > cfg.min_weight_factor:
                    new, reason = max(cfg.min_weight_factor, old - cfg.step), "imbalance"
            elif ratio <= RESTORE_FRACTION * cfg.imbalance_ratio:
                self._over_since.pop(name, None)
                if old < 1.0:
                    since = self._calm_since.setdefault(name, now)
                    if now - since >= cfg.for_:
                        new, reason = min(1.0, old + cfg.step), "restored"
                else:
                    self._calm_since.pop(name, None)
            else:
                self._over_since.pop(name, None)
                self._calm_since.pop(name, None)
            if new != old:
                if new >= 1.0:
                    self._factors.pop(name, None)
                    self._calm_since.pop(name, None)
                else:
                    self._factors[name] = new
                events.append(RebalanceEvent(name, old, new, reason, ratio))
        return events
