from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld.core.interfaces import InterfaceError, Link, select

LINKS = [
    Link("lo", 1, 65536, (IPv4Address("127.0.0.1"),)),
    Link("eth0", 2, 1500, (IPv4Address("192.0.2.11"),)),
    Link("eth1", 3, 9000, (IPv4Address("198.18.0.5"), IPv4Address("198.18.0.6"))),
    Link("eth2", 4, 1500, ()),
]


@pytest.mark.parametrize(
    "ifaces, regexes, default_oif, public_ip, name, addr, ext",
    [
        ([], [], 2, "", "eth0", "192.0.2.11", "192.0.2.11"),
        (["eth1"], [], 2, "", "eth1", "198.18.0.5", "198.18.0.5"),
        (["198.18.0.6"], [], 2, "", "eth1", "198.18.0.6", "198.18.0.6"),
        (["eth2", "eth1"], [], 2, "", "eth1", "198.18.0.5", "198.18.0.5"),  # first usable match
        ([], [r"^198\.18\."], 2, "", "eth1", "198.18.0.5", "198.18.0.5"),
        ([], ["th0$"], 3, "", "eth0", "192.0.2.11", "192.0.2.11"),
        ([], [], 3, "192.0.2.11", "eth0", "192.0.2.11", "192.0.2.11"),  # public IP as iface
        (["eth0"], [], 3, "203.0.113.9", "eth0", "192.0.2.11", "203.0.113.9"),  # NAT
    ],
)
def test_select(ifaces, regexes, default_oif, public_ip, name, addr, ext):
    e = select(LINKS, ifaces, regexes, default_oif, public_ip)
    assert (e.name, str(e.iface_addr), str(e.ext_addr)) == (name, addr, ext)
    assert e.mtu == {"eth0": 1500, "eth1": 9000}[name]


@pytest.mark.parametrize(
    "ifaces, regexes, default_oif, public_ip, words",
    [
        (["nope"], [], 2, "", "nope"),
        (["eth2"], [], 2, "", "eth2"),  # no IPv4 address
        ([], ["("], 2, "", "not a valid regex"),
        ([], [], None, "", "default route"),
        ([], [], 2, "not-an-ip", "--public-ip"),
        ([], [], 2, "203.0.113.9", "203.0.113.9"),  # public IP not on any interface
    ],
)
def test_select_errors(ifaces, regexes, default_oif, public_ip, words):
    with pytest.raises(InterfaceError, match=words):
        select(LINKS, ifaces, regexes, default_oif, public_ip)


def test_selected_interface_carries_the_network_of_its_address():
    """The agent refuses a Network overlapping this (config.underlay_problem)."""
    links = [
        Link(
            "eth1",
            3,
            1500,
            (IPv4Address("198.18.0.5"), IPv4Address("10.1.0.5")),
            (IPv4Network("198.18.0.0/24"), IPv4Network("10.1.0.0/16")),
        )
    ]
    assert select(links, ["10.1.0.5"], [], None).underlay == IPv4Network("10.1.0.0/16")
    assert select(links, ["eth1"], [], None).underlay == IPv4Network("198.18.0.0/24")
    assert select(LINKS, ["eth0"], [], None).underlay is None  # networks not known
