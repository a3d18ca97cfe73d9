import json
from ipaddress import IPv4Address

import pytest

from flanneld.core.lease import LeaseAttrs, RecordError

REFERENCE_VXLAN = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


@pytest.mark.parametrize(
    "raw",
    [
        REFERENCE_VXLAN,
        b'{"PublicIP":"192.0.2.11","PublicIPv6":null,"BackendType":"host-gw"}',
        b'{"PublicIP":"192.0.2.11","PublicIPv6":null}',  # the reference's udp record
    ],
)
def test_reference_records_round_trip_byte_for_byte(raw):
    assert LeaseAttrs.decode(raw).encode() == raw


def test_decode_fields_and_case_insensitive_keys():
    a = LeaseAttrs.decode(b'{"publicip":"10.0.0.1","backendtype":"vxlan","backenddata":{"VNI":2}}')
    assert a.public_ip == IPv4Address("10.0.0.1")
    assert a.backend_type == "vxlan"
    assert a.backend_data == {"VNI": 2}
    assert a.public_ipv6 is None


def test_encode_omits_empty_fields_like_the_reference():
    doc = json.loads(LeaseAttrs(IPv4Address("10.0.0.1")).encode())
    assert doc == {"PublicIP": "10.0.0.1", "PublicIPv6": None}


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"", "JSON"),
        (b"{", "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[1]", "object"),
        (b"{}", "PublicIP"),
        (b'{"PublicIP":"fc00::1"}', "PublicIP"),
        (b'{"PublicIP":"10.0.0.256"}', "PublicIP"),
        (b'{"PublicIP":7}', "PublicIP"),
        (b'{"PublicIP":"10.0.0.1","BackendType":5}', "BackendType"),
        (b'{"PublicIP":"10.0.0.1","PublicIPv6":5}', "PublicIPv6"),
    ],
)
def test_malformed_records(raw, words):
    with pytest.raises(RecordError, match=words):
        LeaseAttrs.decode(raw)


def test_deeply_nested_record_is_one_malformed_record():
    """A 4 KB record nesting BackendData 2,000 deep raised RecursionError, which the watcher
    took for a broken stream and re-listed forever (issue 12, item 2)."""
    raw = b'{"PublicIP":"192.0.2.5","BackendData":' + b"[" * 2000 + b"]" * 2000 + b"}"
    with pytest.raises(RecordError, match="nests deeper") as e:
        LeaseAttrs.decode(raw)
    assert e.value.rule == "malformed"


def test_nesting_a_real_record_never_needs_is_refused_too():
    raw = b'{"PublicIP":"192.0.2.5","BackendData":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(RecordError, match="nests deeper"):
        LeaseAttrs.decode(raw)


def test_oversized_record_is_refused_before_decoding():
    raw = b'{"PublicIP":"192.0.2.5","BackendData":"' + b"x" * 70_000 + b'"}'
    with pytest.raises(RecordError, match="bytes"):
        LeaseAttrs.decode(raw)
