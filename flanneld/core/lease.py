"""Lease records: the JSON value stored under `<prefix>/subnets/<key>` and the lease itself.

The codec writes exactly what the reference writes (`LeaseAttrs` field order, compact JSON,
`PublicIPv6` always present, the rest omitted when empty) and reads records of either
implementation, key names case-insensitive. A record that does not parse raises `RecordError`,
and so does one too big or too deeply nested to be a lease record (any node can write them).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from flanneld.core.bounded import load_bounded
from flanneld.core.config import NO_IPV4, ci_get
from flanneld.core.errors import InputError
from flanneld.core.subnets import ident_of, subnet_key

MAX_RECORD = 64 * 1024  # bytes: a real record is about 150
MAX_DEPTH = 16  # nesting of JSON arrays/objects: a real record has 2


class RecordError(InputError):
    """A lease record in etcd is malformed or breaks a rule; the message says what is wrong
    with it, `rule` names the rule for metrics ("malformed", "key", "outside_network", ...)."""

    def __init__(self, message: str, rule: str = "malformed") -> None:
        super().__init__(message)
        self.rule = rule


def _interned(data: Any) -> Any:
    """BackendData as decoded, a flat object's keys shared with every other record's (they are
    the same few words in thousands of records)."""
    if isinstance(data, dict) and len(data) <= 8:
        return {sys.intern(k): v for k, v in data.items()}
    return data


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Any = None

    @property
    def node_ip(self) -> IPv4Address | IPv6Address:
        """The address that names the node: PublicIP, or in an IPv6-only network (PublicIP
        0.0.0.0) its PublicIPv6."""
        if self.public_ip.is_unspecified and self.public_ipv6 is not None:
            return self.public_ipv6
        return self.public_ip

    def encode(self) -> bytes:
        v6 = str(self.public_ipv6) if self.public_ipv6 is not None else None
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": v6}
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
            doc = load_bounded(raw, "the record", MAX_RECORD, MAX_DEPTH)
        except ValueError as e:
            raise RecordError(str(e)) from None
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
        try:
            addr6 = ip_address(v6) if isinstance(v6, str) and v6 else None
        except ValueError:
            addr6 = None
        if v6 not in (None, "") and not isinstance(addr6, IPv6Address):
            raise RecordError(f"PublicIPv6 {json.dumps(v6)} is not an IPv6 address")
        data, data6 = ci_get(doc, "BackendData"), ci_get(doc, "BackendV6Data")
        return cls(addr, sys.intern(bt), _interned(data), addr6, _interned(data6))


@dataclass(frozen=True, slots=True)
class Lease:
    """A subnet lease as seen in etcd. `etcd_lease == 0` means a reservation (no TTL).
    `create_revision` orders claims: of two records for overlapping space, the older wins.
    `ipv6_subnet` is the IPv6 half of a dual-stack lease (its key then has both); an
    IPv6-only lease has `subnet` NO_IPV4 (key `0.0.0.0-0&fd00:10:244:3::-64`)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    etcd_lease: int = 0
    mod_revision: int = 0
    create_revision: int = 0
    ipv6_subnet: IPv6Network | None = None

    @property
    def has_ipv4(self) -> bool:
        """False for an IPv6-only lease (its IPv4 part is `0.0.0.0/0`)."""
        return self.subnet != NO_IPV4

    @property
    def ident(self) -> IPv4Network | IPv6Network:
        """The subnet that names this lease in the peer table: the IPv4 one, or for an
        IPv6-only lease the IPv6 one."""
        return ident_of(self.subnet, self.ipv6_subnet)

    @property
    def key(self) -> str:
        """The etcd key suffix: `10.244.3.0-24`, or `10.244.3.0-24&fd00:10:244:3::-64`."""
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease == 0
