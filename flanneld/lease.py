"""Lease records: the JSON value stored under `<prefix>/subnets/<key>` and the lease itself.

The codec writes exactly what the reference writes (`LeaseAttrs` field order, compact JSON,
`PublicIPv6` always present, the rest omitted when empty) and reads records of either
implementation, key names case-insensitive. A record that does not parse raises `RecordError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

from .config import ci_get


class RecordError(ValueError):
    """A lease record in etcd is malformed; the message says what is wrong with it."""


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: str | None = None
    backend_v6_data: Any = None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": self.public_ipv6}
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            doc["BackendV6Data"] = self.backend_v6_data
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LeaseAttrs:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise RecordError("not a JSON object")
        pip = ci_get(doc, "PublicIP")
        try:
            addr = ip_address(pip) if isinstance(pip, str) else None
        except ValueError:
            addr = None
        if not isinstance(addr, IPv4Address):
            raise RecordError(f"PublicIP {json.dumps(pip)} is not an IPv4 address")
        bt = ci_get(doc, "BackendType", "") or ""
        if not isinstance(bt, str):
            raise RecordError(f"BackendType {json.dumps(bt)} is not a string")
        v6 = ci_get(doc, "PublicIPv6")
        if v6 is not None and not isinstance(v6, str):
            raise RecordError(f"PublicIPv6 {json.dumps(v6)} is not a string")
        return cls(addr, bt, ci_get(doc, "BackendData"), v6, ci_get(doc, "BackendV6Data"))


@dataclass(frozen=True)
class Lease:
    """A subnet lease as seen in etcd. `etcd_lease == 0` means a reservation (no TTL)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    etcd_lease: int = 0
    mod_revision: int = 0

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease == 0
