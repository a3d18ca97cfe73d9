"""Prometheus metrics: the agent's stats snapshot rendered as `flannel_*` families.

The agent, the lease manager, the watcher, the registry and the backend keep plain counters;
the agent gathers them into an `AgentStats` when scraped and this module renders it, so no
code path carries metric calls. The names are documented in the README.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flanneld.core.admission import RULES
from flanneld.core.stats import AgentStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector:
    def __init__(self, stats: AgentStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        yield GaugeMetricFamily("flannel_ready", "1 once subnet.env is written", st.ready)
        yield GaugeMetricFamily("flannel_peers", "Peer leases known", st.peers)
        yield GaugeMetricFamily(
            "flannel_peers_ipv6", "Peer leases with an IPv6 subnet (dual-stack)", st.peers_ipv6
        )
        if st.lease_expiry is not None:
            yield GaugeMetricFamily(
                "flannel_lease_expiry_timestamp_seconds",
                "When this node's lease expires unless renewed (Unix time)",
                st.lease_expiry,
            )
        if st.renewals is not None:
            yield CounterMetricFamily("flannel_lease_renewals", "Lease renewals", st.renewals)
            yield CounterMetricFamily(
                "flannel_lease_renewal_failures", "Failed lease renewals", st.renewal_failures
            )
        if st.watch_reconnects is not None:
            yield CounterMetricFamily(
                "flannel_watch_reconnects", "Broken etcd watch streams", st.watch_reconnects
            )
            yield CounterMetricFamily(
                "flannel_watch_resyncs", "Full listings of the leases", st.watch_resyncs
            )
            yield CounterMetricFamily(
                "flannel_etcd_data_losses",
                "Times etcd came back without its data (revision went back, new cluster ID)",
                st.etcd_data_losses,
            )
            rejected = GaugeMetricFamily(
                "flannel_lease_records_rejected",
                "Lease records skipped now, by the rule they break",
                labels=["rule"],
            )
            for rule in RULES:
                rejected.add_metric([rule], st.rejected_by_rule.get(rule, 0))
            yield rejected
        yield GaugeMetricFamily(
            "flannel_config_current",
            "1 while the network config in etcd is the one running; 0 when it changed, is "
            "invalid or missing (the agent goes on with the one it runs)",
            int(st.config_current),
        )
        yield CounterMetricFamily(
            "flannel_etcd_request_errors", "Failed etcd requests", st.etcd_errors
        )
        runs = CounterMetricFamily(
            "flannel_reconcile_runs", "Reconcile passes by mode", labels=["mode"]
        )
        for mode, n in sorted(st.reconcile_runs.items()):
            runs.add_metric([mode], n)
        yield runs
        yield GaugeMetricFamily(
            "flannel_reconcile_last_duration_seconds",
            "Duration of the last reconcile pass",
            st.last_reconcile_seconds,
        )
        entries = CounterMetricFamily(
            "flannel_entries",
            "Kernel entries added, removed, repaired (re-added after someone deleted them) or "
            "failed, by kind (route, arp, fdb)",
            labels=["op", "kind"],
        )
        for (op, kind), n in sorted(st.entries.items()):
            entries.add_metric([op, kind], n)
        yield entries
        yield from _udp_families(st.datapath)
        yield from _wireguard_families(st.datapath)


def _wireguard_families(stats: dict[str, int]) -> Iterator[Metric]:
    if "peers_skipped" in stats:
        yield GaugeMetricFamily(
            "flannel_wireguard_peers_skipped",
            "Peer leases the wireguard backend cannot use now (no valid PublicKey, or one an "
            "older lease announced)",
            stats["peers_skipped"],
        )
    if "wireguard_go_starts" in stats:
        yield CounterMetricFamily(
            "flannel_wireguard_go_starts",
            "wireguard-go processes this agent started (userspace device; more than one: "
            "restarts after it died or its device was deleted)",
            stats["wireguard_go_starts"],
        )


def _udp_families(stats: dict[str, int]) -> Iterator[Metric]:
    if "packets_in" not in stats:
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
    for key, n in sorted(stats.items()):
        if key.startswith("kernel:"):  # the tc eBPF fast path's counters
            yield CounterMetricFamily(
                f"flannel_udp_kernel_{key[7:]}",
                f"udp kernel fast path: {key[7:].replace('_', ' ')} (packets)",
                n,
            )
    yield CounterMetricFamily(
        "flannel_udp_device_recreations",
        "Times flannel0 was found deleted and re-created (its datapath with it)",
        stats.get("device_recreations", 0),
    )


def exposition(stats: AgentStats) -> bytes:
    registry = CollectorRegistry()
    registry.register(AgentCollector(stats))
    return generate_latest(registry)
