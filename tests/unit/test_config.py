import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flanneld.core.config import ConfigError, parse_config, underlay_problem
from flanneld.face.ctl import validate_config


@pytest.mark.parametrize(
    "raw, network, subnet_len, smin, smax, backend",
    [
        ('{"Network":"10.3.0.0/16"}', "10.3.0.0/16", 24, "10.3.1.0", "10.3.255.0", "udp"),
        (
            '{"network":"10.3.0.0/16","backend":{"type":"VXLAN"}}',
            "10.3.0.0/16",
            24,
            "10.3.1.0",
            "10.3.255.0",
            "vxlan",
        ),
        ('{"Network":"10.3.0.0/24"}', "10.3.0.0/24", 26, "10.3.0.64", "10.3.0.192", "udp"),
        ('{"Network":"10.3.0.0/28"}', "10.3.0.0/28", 30, "10.3.0.4", "10.3.0.12", "udp"),
        (
            '{"Network":"10.3.7.9/16","SubnetLen":20}',
            "10.3.0.0/16",
            20,
            "10.3.16.0",
            "10.3.240.0",
            "udp",
        ),
        (
            '{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.9.0",'
            '"Backend":{"Type":"host-gw"}}',
            "10.3.0.0/16",
            24,
            "10.3.5.0",
            "10.3.9.0",
            "host-gw",
        ),
        (
            '{"Network":"10.3.0.0/16","SubnetLen":0}',
            "10.3.0.0/16",
            24,
            "10.3.1.0",
            "10.3.255.0",
            "udp",
        ),
    ],
)
def test_defaults_and_overrides(raw, network, subnet_len, smin, smax, backend):
    c = parse_config(raw)
    assert c.network == IPv4Network(network)
    assert c.subnet_len == subnet_len
    assert c.subnet_min == IPv4Address(smin)
    assert c.subnet_max == IPv4Address(smax)
    assert c.backend_type == backend


def test_backend_options_kept():
    c = parse_config('{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan","VNI":4}}')
    assert c.backend["VNI"] == 4


@pytest.mark.parametrize(
    "raw, words",
    [
        ("{", ["not valid JSON"]),
        ("[]", ["JSON object"]),
        ("{}", ["Network", "missing"]),
        ('{"Network":""}', ["Network", "missing"]),
        ('{"Network":"10.3.0.0"}', ["Network", "IPv4 CIDR"]),
        ('{"Network":"fc00::/48"}', ["Network", "IPv4 CIDR"]),
        ('{"Network":17}', ["Network", "IPv4 CIDR"]),
        ('{"Network":"10.3.0.0/29"}', ["/28"]),
        ('{"Network":"10.3.0.0/16","SubnetLen":31}', ["SubnetLen", "less than /31"]),
        ('{"Network":"10.3.0.0/16","SubnetLen":17}', ["SubnetLen", "four subnets"]),
        ('{"Network":"10.3.0.0/16","SubnetLen":"24"}', ["SubnetLen", "integer"]),
        ('{"Network":"10.3.0.0/16","SubnetLen":-1}', ["SubnetLen", "integer"]),
        ('{"Network":"10.3.0.0/16","SubnetMin":"10.4.0.0"}', ["SubnetMin", "not in the range"]),
        ('{"Network":"10.3.0.0/16","SubnetMax":"10.3.0.7"}', ["SubnetMax", "boundary"]),
        ('{"Network":"10.3.0.0/16","SubnetMin":"fc00::"}', ["SubnetMin", "IPv4 address"]),
        (
            '{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.5.0"}',
            ["SubnetMin", "above SubnetMax"],
        ),
        ('{"Network":"10.3.0.0/16","Backend":{}}', ["Backend.Type"]),
        ('{"Network":"10.3.0.0/16","Backend":"vxlan"}', ["Backend", "object"]),
        ('{"Network":"10.3.0.0/16","EnableIPv6":true}', ["IPv6Network", "missing"]),
        ('{"Network":"10.3.0.0/16","EnableIPv4":"yes"}', ["EnableIPv4", "true or false"]),
    ],
)
def test_invalid_configs_name_the_key(raw, words):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "network, words",
    [
        ("0.0.0.0/0", "0.0.0.0/8"),
        ("0.0.0.0/8", "0.0.0.0/8"),
        ("127.0.0.0/8", "loopback"),
        ("127.1.0.0/16", "loopback"),
        ("224.0.0.0/4", "multicast"),
        ("239.1.0.0/16", "multicast"),
        ("169.254.0.0/16", "link-local"),
        ("240.0.0.0/4", "reserved"),
        ("128.0.0.0/1", "link-local"),
    ],
)
def test_networks_that_would_break_the_host_are_refused(network, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_config(json.dumps({"Network": network}))
    assert "Network" in str(e.value)


def test_config_nesting_and_size_are_bounded():
    deep = '{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan", "x": ' + "[" * 3000
    with pytest.raises(ConfigError, match="deeper"):
        parse_config(deep + "]" * 3000 + "}}")
    big = json.dumps({"Network": "10.3.0.0/16", "pad": "x" * 70_000})
    with pytest.raises(ConfigError, match="bytes"):
        parse_config(big)


@pytest.mark.parametrize(
    "underlay, addrs, words",
    [
        ("10.0.0.0/8", ["10.0.0.5"], "underlay network 10.0.0.0/8"),
        ("10.3.5.0/24", ["10.3.5.9"], "underlay network 10.3.5.0/24"),
        (None, ["10.3.9.9"], "address 10.3.9.9"),
        ("192.0.2.0/24", ["192.0.2.5", "10.3.0.7"], "address 10.3.0.7"),
    ],
)
def test_network_overlapping_the_underlay_is_refused(underlay, addrs, words):
    net = IPv4Network("10.3.0.0/16")
    under = IPv4Network(underlay) if underlay else None
    why = underlay_problem(net, under, [IPv4Address(a) for a in addrs])
    assert words in why and "pick a Network" in why


def test_network_clear_of_the_underlay_is_accepted():
    net = IPv4Network("10.3.0.0/16")
    assert underlay_problem(net, IPv4Network("192.0.2.0/24"), [IPv4Address("192.0.2.5")]) == ""


@pytest.mark.parametrize(
    "backend, words",
    [
        ({"Type": "vxlan", "VNI": "x"}, "Backend.VNI"),
        ({"Type": "vxlan", "Port": 70000}, "Backend.Port"),
        ({"Type": "vxlan", "MTU": 100}, "Backend.MTU"),
        ({"Type": "vxlan", "DirectRouting": "yes"}, "Backend.DirectRouting"),
        ({"Type": "udp", "Port": "8285"}, "Backend.Port"),
        ({"Type": "udp", "Port": -1}, "Backend.Port"),
        ({"Type": "wormhole"}, "unknown backend type"),
    ],
)
def test_backend_options_are_validated_before_any_agent_sees_them(backend, words):
    """`flannelctl config validate|set` runs the backend's pure parse_options: a bad option
    used to pass and then crash-loop every agent under systemd (issue 12, item 6)."""
    raw = json.dumps({"Network": "10.3.0.0/16", "Backend": backend}).encode()
    with pytest.raises(ConfigError, match=words):
        validate_config(raw)


def test_valid_backend_options_pass_validation():
    raw = b'{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4, "MTU": 1400}}'
    assert "backend vxlan" in validate_config(raw)


DUAL = {"Network": "10.3.0.0/16", "EnableIPv6": True, "Backend": {"Type": "vxlan"}}


@pytest.mark.parametrize(
    "extra, network, subnet_len, smin, smax",
    [
        ({"IPv6Network": "fd00:10::/48"}, "fd00:10::/48", 64, "fd00:10:0:1::", "fd00:10:0:ffff::"),
        ({"IPv6Network": "fd00:10::/62"}, "fd00:10::/62", 64, "fd00:10:0:1::", "fd00:10:0:3::"),
        ({"IPv6Network": "fd00:10::/63"}, "fd00:10::/63", 65, "fd00:10:0:0:8000::",
         "fd00:10:0:1:8000::"),
        ({"IPv6Network": "fd00:10::/120"}, "fd00:10::/120", 122, "fd00:10::40", "fd00:10::c0"),
        ({"IPv6Network": "fd00:10::5/48", "IPv6SubnetLen": 56}, "fd00:10::/48", 56,
         "fd00:10:0:100::", "fd00:10:0:ff00::"),
        ({"ipv6network": "fd00:10::/48", "ipv6subnetmin": "fd00:10:0:10::",
          "IPv6SubnetMax": "fd00:10:0:20::"}, "fd00:10::/48", 64, "fd00:10:0:10::",
         "fd00:10:0:20::"),
    ],
)  # fmt: skip
def test_ipv6_defaults_and_overrides(extra, network, subnet_len, smin, smax):
    c = parse_config(json.dumps({**DUAL, **extra}))
    assert c.ipv6 is not None
    assert c.ipv6.network == IPv6Network(network) and c.ipv6.subnet_len == subnet_len
    assert (c.ipv6.subnet_min, c.ipv6.subnet_max) == (IPv6Address(smin), IPv6Address(smax))
    assert c.network == IPv4Network("10.3.0.0/16")  # the IPv4 half is untouched


def test_ipv6_off_by_default_and_ignored_when_off():
    assert parse_config('{"Network": "10.3.0.0/16", "IPv6Network": "fd00::/48"}').ipv6 is None


@pytest.mark.parametrize(
    "extra, words",
    [
        ({}, ["IPv6Network", "missing"]),
        ({"IPv6Network": "10.4.0.0/16"}, ["IPv6Network", "IPv6 CIDR"]),
        ({"IPv6Network": "fd00::"}, ["IPv6Network", "IPv6 CIDR"]),
        ({"IPv6Network": "fd00::/125"}, ["IPv6Network", "/124"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetLen": 127}, ["IPv6SubnetLen", "less than /127"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetLen": 49}, ["IPv6SubnetLen", "four subnets"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetLen": "64"}, ["IPv6SubnetLen", "integer"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::"}, ["IPv6SubnetMin", "range"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00::1"}, ["IPv6SubnetMax", "boundary"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMin": "10.3.0.0"}, ["IPv6SubnetMin", "IPv6"]),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd00:0:0:9::",
          "IPv6SubnetMax": "fd00:0:0:5::"}, ["IPv6SubnetMin", "above"]),
        ({"IPv6Network": "::/0"}, ["IPv6Network", "::/8"]),
        ({"IPv6Network": "::1/128"}, ["IPv6Network", "::/8"]),
        ({"IPv6Network": "fe80::/64"}, ["IPv6Network", "link-local"]),
        ({"IPv6Network": "ff02::/16"}, ["IPv6Network", "multicast"]),
        ({"IPv6Network": "fd00::/48", "Backend": {"Type": "udp"}}, ["EnableIPv6", "udp"]),
        ({"IPv6Network": "fd00::/48", "Backend": None}, ["EnableIPv6", "udp"]),
        ({"IPv6Network": "fd00::/48", "EnableIPv4": False, "EnableIPv6": False},
         ["EnableIPv4", "no address family"]),
        ({"EnableIPv4": False}, ["IPv6Network", "missing"]),
        ({"IPv6Network": "fd00::/48", "EnableIPv4": False, "Backend": {"Type": "udp"}},
         ["EnableIPv6", "udp"]),
        ({"IPv6Network": "fd00::/48", "EnableIPv4": "false"}, ["EnableIPv4", "true or false"]),
    ],
)  # fmt: skip
def test_invalid_ipv6_configs_name_the_key(extra, words):
    with pytest.raises(ConfigError) as exc:
        parse_config(json.dumps({k: v for k, v in {**DUAL, **extra}.items() if v is not None}))
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("network", [None, "10.3.0.0/16", "not even a CIDR"])
def test_ipv6_only_has_no_ipv4_range_and_ignores_the_ipv4_keys(network):
    """EnableIPv4 false: the IPv4 keys mean nothing (even invalid ones), only the IPv4 part
    of an IPv6-only key (0.0.0.0/0) fits."""
    doc = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56",
           "Backend": {"Type": "vxlan"}}  # fmt: skip
    if network is not None:
        doc["Network"] = network
    c = parse_config(json.dumps(doc))
    assert c.network is None and not c.ipv4
    assert c.ipv6 is not None and c.ipv6.network == IPv6Network("fd00:10:244::/56")
    assert c.contains_lease(IPv4Network("0.0.0.0/0"))
    assert not c.contains_lease(IPv4Network("10.3.1.0/24"))
    assert parse_config(json.dumps({**DUAL, "IPv6Network": "fd00::/48", "EnableIPv4": True})).ipv4


def test_validation_summary_names_each_family_of_the_network():
    v6only = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48",
              "Backend": {"Type": "host-gw"}}  # fmt: skip
    summary = validate_config(json.dumps(v6only).encode())
    assert "IPv6 network fd00::/48, subnets /64" in summary and "network None" not in summary
    dual = validate_config(json.dumps({**v6only, "EnableIPv4": True, "Network": "10.3.0.0/16"}))
    assert "network 10.3.0.0/16" in dual and "IPv6 network fd00::/48" in dual
