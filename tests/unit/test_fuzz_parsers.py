"""Property tests: the config parser, the subnet-key parser and the record codec take any
input without an exception other than their own one-line error, and round-trip what they
accept."""

from __future__ import annotations

import contextlib
import json
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from flanneld.core.config import ConfigError, parse_config
from flanneld.core.lease import LeaseAttrs, RecordError
from flanneld.core.subnets import parse_subnet_key, subnet_key

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
config_keys = st.sampled_from(
    [
        "Network",
        "network",
        "SubnetLen",
        "SubnetMin",
        "SubnetMax",
        "Backend",
        "EnableIPv4",
        "EnableIPv6",
        "Other",
    ]
)
cidrs = st.builds(
    lambda a, p: f"{IPv4Address(a)}/{p}", st.integers(0, 2**32 - 1), st.integers(0, 32)
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(config_keys, json_values | cidrs, max_size=6) | json_values)
def test_config_parser_raises_only_config_error(doc):
    try:
        c = parse_config(json.dumps(doc))
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert c.subnet_min <= c.subnet_max
    assert c.subnet_min in c.network and c.subnet_max in c.network
    assert c.network.prefixlen + 2 <= c.subnet_len <= 30


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_config_parser_on_raw_bytes(raw):
    with contextlib.suppress(ConfigError):  # any other exception fails the test
        parse_config(raw)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789.-&:abcdef/ ", max_size=40))
def test_subnet_key_parser_never_raises(key):
    net = parse_subnet_key(key)
    if net is not None:
        assert parse_subnet_key(subnet_key(net)) == net


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_subnet_key_round_trip(addr, plen):
    net = IPv4Network((addr, plen), strict=False)
    assert parse_subnet_key(subnet_key(net)) == net


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_record_decoder_raises_only_record_error(raw):
    try:
        attrs = LeaseAttrs.decode(raw)
    except RecordError as e:
        assert "\n" not in str(e)
        return
    assert LeaseAttrs.decode(attrs.encode()) == attrs


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["", "host-gw", "vxlan"]),
    st.none() | st.dictionaries(st.sampled_from(["VNI", "VtepMAC"]), st.integers(0, 9)),
)
def test_record_round_trip(addr, backend_type, data):
    attrs = LeaseAttrs(IPv4Address(addr), backend_type, data)
    assert LeaseAttrs.decode(attrs.encode()) == attrs
