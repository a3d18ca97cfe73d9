"""Backends by type name, looked up case-insensitively as flannel's manager does; each backend
module registers its class with `@register("name")`."""

from __future__ import annotations

from collections.abc import Callable

from flanneld.core.config import ConfigError, NetworkConfig, parse_config

from .base import Backend, BackendError

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


def checked_config(raw: bytes | str) -> NetworkConfig:
    """The network config with its Backend object checked by its backend's pure
    `parse_options()`: ConfigError naming the key and the fix, whatever is wrong."""
    config = parse_config(raw)
    try:
        backend = get_backend(config.backend_type)
    except BackendError as e:  # an unknown type
        raise ConfigError(str(e)) from None
    backend.parse_options(config.backend)
    backend.check_network(config)
    return config
