"""Backends by type name, looked up case-insensitively as flannel's manager does; each backend
module registers its class with `@register("name")`."""

from __future__ import annotations

from collections.abc import Callable

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
