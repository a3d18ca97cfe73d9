"""The backends: the contract (`base`), the registry by type name, and host-gw, vxlan, udp and
wireguard. Importing this package registers all four."""

from __future__ import annotations

from . import hostgw, udp, vxlan, wireguard  # noqa: F401 - each registers itself
from .registry import checked_config, get_backend, known_backends, register

__all__ = ["checked_config", "get_backend", "known_backends", "register"]
