"""The backends: the contract (`base`), the registry by type name, and host-gw, vxlan, udp and
wireguard. Importing this package registers all four."""

from __future__ import annotations

from . import hostgw, udp, vxlan, wireguard  # noqa: F401 - each registers itself
from .registry import checked_config, get_backend, known_backends, register

__all__ = ["checked_config", "cleanup_all", "get_backend", "known_backends", "register"]


async def cleanup_all(netns: str | None = None) -> list[str]:
    """`flannelctl cleanup`: what every backend leaves besides its routes and devices
    (`Backend.cleanup`), removed; as text."""
    return [item for name in known_backends() for item in await get_backend(name).cleanup(netns)]
