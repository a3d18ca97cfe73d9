"""What an agent reports: the metrics' snapshot (`AgentStats`) and the document `flannelctl
status` shows (lease, backend, etcd, config, peers with their datapath health, rejected
records). Read-only over the agent's state."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flanneld import __version__
from flanneld.core.stats import AgentStats

if TYPE_CHECKING:
    from flanneld.agent.daemon import Agent


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def stats_of(agent: Agent) -> AgentStats:
    """The snapshot the metrics render."""
    lm, w = agent.leases, agent.watcher
    lease = lm.lease if lm else None
    peers = agent.peers(lease.ident) if w and lease else {}
    expiry = None
    if lm is not None and lm.expires_at is not None:
        expiry = time.time() + (lm.expires_at - time.monotonic())
    return AgentStats(
        ready=agent.ready,
        peers=len(peers),
        peers_ipv6=sum(p.ipv6_subnet is not None for p in peers.values()),
        lease_expiry=expiry,
        renewals=lm.renewals if lm else None,
        renewal_failures=lm.renew_failures if lm else 0,
        watch_reconnects=w.reconnects if w else None,
        watch_resyncs=w.resyncs if w else 0,
        etcd_data_losses=w.data_losses if w else 0,
        rejected_by_rule=w.table.rejected_by_rule() if w else {},
        etcd_errors=agent.registry.errors,
        config_current=not agent.config_problem,
        reconcile_runs=dict(agent.reconcile_runs),
        last_reconcile_seconds=agent.last_reconcile_seconds,
        entries=dict(agent.entry_counts),
        datapath=agent.backend.stats() if agent.backend else {},
    )

async def status_of(agent: Agent) -> dict:
    """What `flannelctl status` shows: lease, backend, peers and their datapath health."""
    lm, backend, config = agent.leases, agent.backend, agent.config
    lease = lm.lease if lm else None
    doc: dict = {
        "ready": agent.ready,
        "version": __version__,
        "network": _str_or_none(config.network) if config else None,
        "ipv6_network": _str_or_none(config.ipv6.network) if config and config.ipv6 else None,
        "backend": backend.type_name if backend else None,
        "mtu": backend.mtu if backend and lease else None,
        "etcd": {
            "endpoint": str(agent.registry.endpoint),
            "reachable": not agent.registry.last_error,
            "last_error": agent.registry.last_error or None,
        },
        "config": {
            "source": agent.config_source or None,
            "problem": agent.config_problem or None,
        },
        "lease": None,
        "peers": [],
        "rejected": [
            {"key": key, "rule": r.rule, "why": r.why}
            for key, r in sorted(agent.watcher.table.rejected.items())
        ]
        if agent.watcher
        else [],
    }
    if lease is None or backend is None:
        return doc
    now = time.monotonic()
    doc["public_ip"] = str(lease.attrs.public_ip)
    doc["public_ipv6"] = _str_or_none(lease.attrs.public_ipv6)
    doc["lease"] = {
        "subnet": str(lease.subnet) if lease.has_ipv4 else None,
        "ipv6_subnet": _str_or_none(lease.ipv6_subnet),
        "reservation": lease.is_reservation,
        "expires_in": None if lm.expires_at is None else round(lm.expires_at - now),
        "renew_in": None if lm.renew_delay() is None else round(lm.renew_delay()),
    }
    peers = agent.peers(lease.ident)
    try:
        missing = await backend.inspect(lease, peers)
        doc["datapath_error"] = None
    except Exception as e:  # noqa: BLE001 - report it; the status must still answer
        missing, doc["datapath_error"] = {}, str(e)
    for subnet, peer in sorted(peers.items()):
        gaps = missing.get(subnet)
        doc["peers"].append(
            {
                "subnet": str(subnet) if peer.has_ipv4 else None,
                "public_ip": str(peer.attrs.public_ip),
                "ipv6_subnet": _str_or_none(peer.ipv6_subnet),
                "public_ipv6": _str_or_none(peer.attrs.public_ipv6),
                "backend_type": peer.attrs.backend_type,
                "backend_data": peer.attrs.backend_data,
                "last_change": agent.peer_changed.get(subnet),
                "missing": gaps or [],
                "state": "unknown" if gaps is None else ("drifted" if gaps else "ok"),
            }
        )
    return doc
