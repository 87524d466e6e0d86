"""The cluster families of one replica (docs/cluster.md), read at scrape time.

Each replica exports its own membership view and only its own observer verdicts
(``ha_master_observer_failed{observer=<this replica>}``), so N replicas scraped together
never count a series twice: dashboards and rules aggregate by master or take max/min.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.cluster.figures import ClusterFigures

HELP = {
    "ha_cluster_members": "Live cluster members seen in etcd.",
    "ha_cluster_leader": "1 on the replica that holds the leader lease, 0 elsewhere.",
    "ha_cluster_epoch": "The current leader's fencing epoch.",
    "ha_cluster_probed_masters": "Masters this replica probes (its shard).",
    "ha_master_observer_failed": "1 where this replica's own probes see the master failed "
                                 "(its verdict; the cluster fails a master on a quorum).",
}


class ClusterCollector:
    """Nothing when the exporter runs as a single node (``source`` returns None)."""

    def __init__(self, source: Callable[[], ClusterFigures | None]) -> None:
        self.source = source

    def collect(self) -> list[Metric]:
        f = self.source()
        if f is None:
            return []
        out: list[Metric] = [
            GaugeMetricFamily("ha_cluster_members", HELP["ha_cluster_members"], f.members),
            GaugeMetricFamily("ha_cluster_leader", HELP["ha_cluster_leader"], int(f.leader)),
            GaugeMetricFamily("ha_cluster_epoch", HELP["ha_cluster_epoch"], f.epoch),
            GaugeMetricFamily("ha_cluster_probed_masters", HELP["ha_cluster_probed_masters"],
                              f.probed),
        ]
        observed = GaugeMetricFamily("ha_master_observer_failed",
                                     HELP["ha_master_observer_failed"],
                                     labels=("master", "observer"))
        for master, failed in sorted(f.observer_failed.items()):
            observed.add_metric((master, f.member), int(failed))
        out.append(observed)
        return out
