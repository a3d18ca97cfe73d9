"""What the agent tells the outside about itself: one frozen snapshot of its counters, taken
when scraped, so the metrics renderer reads this instead of reaching into the agent's parts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AgentStats:
    ready: bool = False
    peers: int = 0
    peers_ipv6: int = 0  # of them, with an IPv6 subnet (dual-stack)
    lease_expiry: float | None = None  # Unix time; None: no lease yet, or a reservation
    renewals: int | None = None  # None until the lease manager runs
    renewal_failures: int = 0
    watch_reconnects: int | None = None  # None until the peer watch runs
    watch_resyncs: int = 0
    etcd_data_losses: int = 0
    rejected_by_rule: Mapping[str, int] = field(default_factory=dict)
    etcd_errors: int = 0
    config_current: bool = True
    reconcile_runs: Mapping[str, int] = field(default_factory=dict)  # by mode
    last_reconcile_seconds: float = 0.0
    entries: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (op, kind)
    datapath: Mapping[str, int] = field(default_factory=dict)  # the backend's counters (udp)
