"""What the masters themselves say they serve: the truth the exporter's own beliefs are
checked against.

A master serves a duty when its last probe answered, it reports ``active: true`` and the duty
is in its ``duties`` list. A master that did not answer says nothing: it is counted as
serving nothing, since nobody can tell whether it still does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exporter.fleet.runtime import MasterRuntime


def reported_holders(
    masters: Iterable[MasterRuntime], duties: Iterable[str]
) -> Mapping[str, tuple[str, ...]]:
    """{duty: masters that report serving it, sorted by name} for every duty in ``duties``
    (a duty nobody reports maps to an empty tuple); duties reported but not listed are left
    out."""
    holders: dict[str, list[str]] = {duty: [] for duty in duties}
    for rt in masters:
        if not rt.up or rt.reported_active is not True or not rt.reported_duties:
            continue
        for duty in rt.reported_duties:
            names = holders.get(duty)
            if names is not None:
                names.append(rt.name)
    return {duty: tuple(sorted(names)) for duty, names in holders.items()}
