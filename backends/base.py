"""The contract between the agent and a backend, and what a reconcile pass reports.

Lifecycle, driven by the agent (after `parse_options()` accepted the config's Backend object):
  1. `prepare()`    before the lease: check the host, create devices whose identity goes into
                    the lease record (vxlan's VTEP MAC); returns the record to publish.
  2. `configure(l)` once a lease is held (and again if it ever changes): addresses, MTU.
  3. `reconcile(l, peers, full)` on every peer change (full=False: no dump, the backend's
                    own record of what it applied) and every period (full=True: a fresh dump,
                    so drift is repaired): make the kernel match the plan for these peers,
                    touching only what the backend owns.
  4. `close()`      on shutdown: release sockets; kernel state stays (zero-downtime restart),
                    except what cannot outlive the agent (the udp TUN device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from flanneld.core.config import NetworkConfig
from flanneld.core.errors import StateError
from flanneld.core.interfaces import ExternalInterface
from flanneld.core.lease import Lease, LeaseAttrs


class BackendError(StateError):
    """The backend cannot run on this host as configured; the message says why and the fix."""


@dataclass
class ReconcileResult:
    """What one reconcile pass did, by entry kind ("route", "arp", "fdb"). `repaired` counts
    the added entries that were in the previous plan too: someone had deleted them."""

    added: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    def count(self, table: dict[str, int], kind: str, n: int = 1) -> None:
        if n:
            table[kind] = table.get(kind, 0) + n

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class BackendContext:
    """Everything a backend is built from."""

    ext: ExternalInterface
    config: NetworkConfig
    state_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)  # the config's Backend object


class Backend(ABC):
    type_name: str = ""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> Any:
        """Validate the config's Backend object, touching nothing (pure): ConfigError naming
        the key and the fix. `flannelctl config validate|set` and the agent (before it changes
        anything) call it, so a bad option never reaches a running node. Default: none."""
        return None

    @classmethod
    def check_network(cls, config: NetworkConfig) -> None:
        """What the backend's options cannot be alone, checked against the rest of the
        network config (vxlan: a VNI whose IPv6 device name is too long with EnableIPv6);
        pure, run after `parse_options()` by the same callers. Default: nothing."""
        return None

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        """The devices this backend creates, as (link kind, full-match name regex) pairs, so
        `flannelctl cleanup` removes exactly those. Default: none."""
        return ()

    @classmethod
    async def cleanup(cls, netns: str | None = None) -> list[str]:
        """`flannelctl cleanup`: remove what the backend leaves besides its routes and
        `owned_devices` (in this namespace or the named one); what was removed, as text.
        Default: nothing."""
        return []

    @property
    @abstractmethod
    def mtu(self) -> int:
        """The MTU containers must use (FLANNEL_MTU)."""

    @abstractmethod
    async def prepare(self) -> LeaseAttrs: ...

    async def configure(self, lease: Lease) -> None:  # noqa: B027 - optional hook
        """Set up what depends on the lease; default: nothing."""

    @abstractmethod
    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        """Make the kernel match the plan. `full`: compare against a fresh dump of what the
        backend owns; otherwise against what it knows it applied (a pass after a peer event)."""

    async def inspect(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease]
    ) -> dict[IPv4Network, list[str]]:
        """For each peer, the kernel entries the plan wants that are missing (status)."""
        return {subnet: [] for subnet in peers}

    async def intact(self) -> bool:
        """False when something the backend made is gone (vxlan: its device), so the agent
        runs a full pass at once instead of waiting for the next one; must be cheap (it runs
        every --reconcile-interval). Default: True."""
        return True

    def stats(self) -> dict[str, int]:
        """Datapath counters for metrics (udp); default: none."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; kernel state stays unless it cannot outlive the agent."""


def skip_reason(local: Lease, subnet: IPv4Network, peer: Lease, types: tuple[str, ...]) -> str:
    """Why a backend must not program `peer` ("" when it may): our own subnet, our own
    PublicIP, or a BackendType other than `types` (lower case; "" accepts a record without one,
    as the reference's udp writes). One warning line, naming the peer and the fix."""
    ip = peer.attrs.node_ip
    why = ""
    if subnet == local.ident:
        why = "it is our subnet"
    elif ip == local.attrs.node_ip:
        why = "its PublicIP is ours; two nodes must not share a public address"
    elif peer.attrs.backend_type.lower() not in types:
        want = " or ".join(repr(t) for t in types if t)
        why = (
            f"its BackendType is {peer.attrs.backend_type!r}, not {want}; "
            "run one backend type per network"
        )
    return f"skipping peer lease {subnet} (PublicIP {ip}): {why}" if why else ""


def ipv6_half_problem(local: Lease, peer: Lease, fix: str) -> str:
    """Why a peer's IPv6 half cannot be planned before its backend data is looked at ("" when
    it can): no IPv6 subnet or PublicIPv6, or ours. `fix` ends the line about a missing
    PublicIPv6."""
    if peer.ipv6_subnet is None:
        return "its lease has no IPv6 subnet; restart the agent on that node with EnableIPv6"
    if peer.attrs.public_ipv6 is None:
        return f"its lease names no PublicIPv6; {fix}"
    if peer.ipv6_subnet == local.ipv6_subnet:
        return "it is our IPv6 subnet"
    if peer.attrs.public_ipv6 == local.attrs.public_ipv6:
        return "its PublicIPv6 is ours; two nodes must not share a public address"
    return ""
