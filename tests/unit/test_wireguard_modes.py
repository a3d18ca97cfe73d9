"""wireguard's single-device modes ("auto", "ipv4", "ipv6" with EnableIPv6, as the
reference's): one peer per lease on flannel-wg with both its subnets, the endpoint by mode."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from backends import checked_config
from backends.wireguard.keys import encode_key, public_key
from backends.wireguard.plan import endpoint_for, plan_single
from backends.wireguard.uapi import PeerConfig
from flanneld.core.config import ConfigError
from flanneld.core.lease import Lease, LeaseAttrs

NO_V4 = IPv4Network("0.0.0.0/0")


def key(n: int) -> bytes:
    return public_key(bytes([n]) * 32)


def lease(n: int, ip4: str | None, ip6: str | None, created: int = 0, **data) -> Lease:
    rec = {"PublicKey": encode_key(key(n))}
    attrs = LeaseAttrs(
        IPv4Address(ip4 or 0),
        "wireguard",
        data.get("v4", rec) if ip4 else None,
        IPv6Address(ip6) if ip6 else None,
        data.get("v6", rec) if ip6 else None,
    )
    v4 = IPv4Network(f"10.244.{n}.0/24") if ip4 else NO_V4
    v6 = IPv6Network(f"fd00:10:244:{n}::/64") if ip6 else None
    return Lease(v4, attrs, 7, created, created, v6)


OURS = lease(1, "192.0.2.11", "fd00:192::11")


def by_ident(*leases: Lease) -> dict:
    return {x.ident: x for x in leases}


@pytest.mark.parametrize(
    ("mode", "endpoint"),
    [("ipv4", IPv4Address("192.0.2.12")), ("ipv6", IPv6Address("fd00:192::12"))],
)
def test_one_peer_per_lease_with_both_subnets_at_the_modes_address(mode, endpoint):
    peer = lease(2, "192.0.2.12", "fd00:192::12")
    planned, warnings = plan_single(OURS, by_ident(peer), 51820, mode, (4, 6))
    nets = frozenset({IPv4Network("10.244.2.0/24"), IPv6Network("fd00:10:244:2::/64")})
    assert warnings == [] and planned == {PeerConfig(key(2), (endpoint, 51820), nets)}


def test_auto_picks_as_the_reference() -> None:
    attrs = LeaseAttrs(IPv4Address("192.0.2.12"), public_ipv6=IPv6Address("2001:db8::12"))
    assert endpoint_for(attrs, "auto", True, None) == IPv4Address("192.0.2.12")  # not RFC 1918
    private4 = LeaseAttrs(IPv4Address("10.0.0.12"), public_ipv6=IPv6Address("2001:db8::12"))
    assert endpoint_for(private4, "auto", True, IPv6Address("2001:db8::11")) == (
        IPv6Address("2001:db8::12")
    )
    assert endpoint_for(private4, "auto", True, IPv6Address("fd00::11")) == (
        IPv4Address("10.0.0.12")  # our IPv6 is unique-local: IPv4, and cross fingers
    )
    assert endpoint_for(attrs, "auto", False, None) == IPv4Address("192.0.2.12")
    only6 = LeaseAttrs(IPv4Address(0), public_ipv6=IPv6Address("fd00::12"))
    assert endpoint_for(only6, "auto", True, None) == IPv6Address("fd00::12")  # 0.0.0.0: none
    assert endpoint_for(only6, "ipv4", True, None) is None


def test_ipv6_only_network_single_device() -> None:
    ours = lease(1, None, "fd00:192::11")
    peer = lease(2, None, "fd00:192::12")
    planned, warnings = plan_single(ours, by_ident(peer), 51820, "auto", (6,))
    assert warnings == []
    assert planned == {
        PeerConfig(
            key(2),
            (IPv6Address("fd00:192::12"), 51820),
            frozenset({IPv6Network("fd00:10:244:2::/64")}),
        )
    }


def test_bad_halves_and_records_skipped_with_the_fix_others_kept() -> None:
    good = lease(2, "192.0.2.12", "fd00:192::12", created=1)
    no_v6 = lease(3, "192.0.2.13", None, created=2)  # IPv4 only in a dual-stack network
    bad_key = lease(4, "192.0.2.14", "fd00:192::14", created=3, v6={"PublicKey": "x"})
    copied = lease(5, "192.0.2.15", "fd00:192::15", created=4, v6=good.attrs.backend_v6_data)
    no_ip6 = lease(6, "192.0.2.16", "fd00:192::16", created=5)
    no_ip6 = Lease(no_ip6.subnet, LeaseAttrs(IPv4Address("192.0.2.16"), "wireguard",
                   no_ip6.attrs.backend_data), 7, 5, 5, no_ip6.ipv6_subnet)  # fmt: skip
    peers = by_ident(good, no_v6, bad_key, copied, no_ip6)
    planned, warnings = plan_single(OURS, peers, 51820, "ipv6", (4, 6))
    assert {p.public_key for p in planned} == {key(2)}
    text = "\n".join(warnings)
    assert "10.244.3.0/24" in text and "EnableIPv6" in text
    assert "not base64" in text and "a key of its own" in text
    assert 'no PublicIPv6 for Mode "ipv6"' in text
    # the same leases in "ipv4" mode: the IPv4-only lease is a peer with its IPv4 subnet
    planned4, _ = plan_single(OURS, peers, 51820, "ipv4", (4, 6))
    assert (
        PeerConfig(
            key(3), (IPv4Address("192.0.2.13"), 51820), frozenset({IPv4Network("10.244.3.0/24")})
        )
        in planned4
    )


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        ('"EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"', None),
        ('"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"', "ipv4"),
        ("", "ipv6"),
    ],
)
def test_the_config_check_refuses_a_mode_without_its_family(config, refused) -> None:
    network = '"Network": "10.244.0.0/16", ' if "EnableIPv4" not in config else ""
    extra = f", {config}" if config else ""
    for mode in ("auto", "ipv4", "ipv6", "separate"):
        raw = f'{{{network}"Backend": {{"Type": "wireguard", "Mode": "{mode}"}}{extra}}}'
        raw = raw.replace("{, ", "{")
        if mode == refused:
            with pytest.raises(ConfigError, match=f'Mode "{mode}"'):
                checked_config(raw)
        else:
            assert checked_config(raw)
