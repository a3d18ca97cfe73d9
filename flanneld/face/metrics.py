"""Prometheus metrics, read from the agent's own counters when scraped.

The agent, the lease manager, the watcher, the registry and the backend keep plain counters;
this collector turns them into `flannel_*` metric families on each scrape, so no code path
carries metric calls. The names are documented in the README.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flanneld.core.admission import RULES

if TYPE_CHECKING:
    from flanneld.agent.daemon import Agent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:  # noqa: C901 - one family after the other
        a = self.agent
        yield GaugeMetricFamily("flannel_ready", "1 once subnet.env is written", a.ready)
        peers = (
            len(a.peers(a.leases.lease.subnet)) if a.watcher and a.leases and a.leases.lease else 0
        )
        yield GaugeMetricFamily("flannel_peers", "Peer leases known", peers)
        lm = a.leases
        if lm is not None:
            if lm.expires_at is not None:
                expiry = time.time() + (lm.expires_at - time.monotonic())
                yield GaugeMetricFamily(
                    "flannel_lease_expiry_timestamp_seconds",
                    "When this node's lease expires unless renewed (Unix time)",
                    expiry,
                )
            yield CounterMetricFamily("flannel_lease_renewals", "Lease renewals", lm.renewals)
            yield CounterMetricFamily(
                "flannel_lease_renewal_failures", "Failed lease renewals", lm.renew_failures
            )
        if a.watcher is not None:
            yield CounterMetricFamily(
                "flannel_watch_reconnects", "Broken etcd watch streams", a.watcher.reconnects
            )
            yield CounterMetricFamily(
                "flannel_watch_resyncs", "Full listings of the leases", a.watcher.resyncs
            )
            yield CounterMetricFamily(
                "flannel_etcd_data_losses",
                "Times etcd came back without its data (revision went back, new cluster ID)",
                a.watcher.data_losses,
            )
            rejected = GaugeMetricFamily(
                "flannel_lease_records_rejected",
                "Lease records skipped now, by the rule they break",
                labels=["rule"],
            )
            by_rule = a.watcher.table.rejected_by_rule()
            for rule in RULES:
                rejected.add_metric([rule], by_rule.get(rule, 0))
            yield rejected
        yield GaugeMetricFamily(
            "flannel_config_current",
            "1 while the network config in etcd is the one running; 0 when it changed, is "
            "invalid or missing (the agent goes on with the one it runs)",
            0 if a.config_problem else 1,
        )
        yield CounterMetricFamily(
            "flannel_etcd_request_errors", "Failed etcd requests", a.registry.errors
        )
        runs = CounterMetricFamily(
            "flannel_reconcile_runs", "Reconcile passes by mode", labels=["mode"]
        )
        for mode, n in sorted(a.reconcile_runs.items()):
            runs.add_metric([mode], n)
        yield runs
        yield GaugeMetricFamily(
            "flannel_reconcile_last_duration_seconds",
            "Duration of the last reconcile pass",
            a.last_reconcile_seconds,
        )
        entries = CounterMetricFamily(
            "flannel_entries",
            "Kernel entries added, removed, repaired (re-added after someone deleted them) or "
            "failed, by kind (route, arp, fdb)",
            labels=["op", "kind"],
        )
        for (op, kind), n in sorted(a.entry_counts.items()):
            entries.add_metric([op, kind], n)
        yield entries
        yield from _udp_families(a.backend.stats() if a.backend else {})


def _udp_families(stats: dict[str, int]) -> Iterator[Metric]:
    if not stats:
        return
    packets = CounterMetricFamily(
        "flannel_udp_packets", "Packets through the udp backend", labels=["direction"]
    )
    data = CounterMetricFamily(
        "flannel_udp_bytes", "Bytes through the udp backend", labels=["direction"]
    )
    drops = CounterMetricFamily(
        "flannel_udp_drops", "Packets dropped, by reason", labels=["reason"]
    )
    trains = CounterMetricFamily(
        "flannel_udp_trains",
        "TCP super-packets sent or received as one train of tagged chunks",
        labels=["direction"],
    )
    for key, n in sorted(stats.items()):
        if key.startswith("drop:"):
            drops.add_metric([key[5:]], n)
        elif key in ("packets_in", "packets_out"):
            packets.add_metric([key[8:]], n)
        elif key in ("bytes_in", "bytes_out"):
            data.add_metric([key[6:]], n)
        elif key in ("trains_in", "trains_out"):
            trains.add_metric([key[7:]], n)
    yield from (packets, data, drops, trains)


def exposition(agent: Agent) -> bytes:
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    return generate_latest(registry)
