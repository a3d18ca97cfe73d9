from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld.config import ConfigError, parse_config


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
        ('{"Network":"10.3.0.0/16","EnableIPv6":true}', ["EnableIPv6"]),
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
