from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld.core.subnets import OverlapIndex, first_host, iter_range, parse_subnet_key, subnet_key


@pytest.mark.parametrize(
    "key, expect",
    [
        ("10.1.15.0-24", "10.1.15.0/24"),
        ("10.5.52.0-24&fc00:0:0:5::-64", "10.5.52.0/24"),
        ("10.1.15.5-24", None),  # host bits set
        ("10.1.15.0-33", None),
        ("10.1.15-24", None),
        ("300.1.15.0-24", None),
        ("config", None),
        ("10.1.15.0-24x", None),
        ("", None),
    ],
)
def test_parse_subnet_key(key, expect):
    got = parse_subnet_key(key)
    assert got == (IPv4Network(expect) if expect else None)


def test_key_round_trip():
    net = IPv4Network("10.244.3.0/24")
    assert subnet_key(net) == "10.244.3.0-24"
    assert parse_subnet_key(subnet_key(net)) == net


def test_first_host():
    assert first_host(IPv4Network("10.5.52.0/24")) == "10.5.52.1/24"


def test_iter_range_inclusive():
    nets = list(iter_range(IPv4Address("10.0.1.0"), IPv4Address("10.0.3.0"), 24))
    assert nets == [IPv4Network(f"10.0.{i}.0/24") for i in (1, 2, 3)]


@pytest.mark.parametrize(
    "members, probe, overlaps",
    [
        (["10.0.1.0/24"], "10.0.1.0/24", True),
        (["10.0.1.0/24"], "10.0.2.0/24", False),
        (["10.0.0.0/16"], "10.0.9.0/24", True),  # member contains probe
        (["10.0.9.128/25"], "10.0.9.0/24", True),  # probe contains member
        (["10.0.10.0/25"], "10.0.9.0/24", False),
        ([], "10.0.9.0/24", False),
    ],
)
def test_overlap_index(members, probe, overlaps):
    idx = OverlapIndex([IPv4Network(m) for m in members])
    assert idx.overlaps(IPv4Network(probe)) is overlaps
