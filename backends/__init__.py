"""Backends by type name (case-insensitive, as flannel's manager looks them up).

Each backend module registers itself with `@register("name")`; importing this package
imports them all.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Backend, BackendContext, BackendError, ExternalInterface, ReconcileResult

_REGISTRY: dict[str, type[Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def deco(cls: type[Backend]) -> type[Backend]:
        cls.type_name = name
        _REGISTRY[name.lower()] = cls
        return cls

    return deco


def get_backend(name: str) -> type[Backend]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BackendError(
            f"network config: unknown backend type {name!r}; set Backend.Type to one of: {known}"
        ) from None


def known_backends() -> list[str]:
    return sorted(_REGISTRY)


from . import hostgw  # noqa: E402,F401  (registers "host-gw")
from .udp import UdpBackend  # noqa: E402,F401  (registers "udp")
from .vxlan import VxlanBackend  # noqa: E402,F401  (registers "vxlan")

__all__ = [
    "Backend",
    "BackendContext",
    "BackendError",
    "ExternalInterface",
    "ReconcileResult",
    "get_backend",
    "known_backends",
    "register",
]
