"""wireguard without a kernel: options, X25519 against RFC 7748's vectors, the key file, the
UAPI text codec (both ways) and the pure plan (peer leases to WireGuard peers, hostile records
skipped) with the diff it feeds."""

import base64
import os
import stat
from ipaddress import IPv4Address, IPv4Network

import pytest

from backends import get_backend
from backends.base import BackendError
from backends.reconcile import diff
from backends.wireguard import WireguardBackend
from backends.wireguard.keyfile import key_path, load_or_create, load_psk
from backends.wireguard.keys import (
    BadKey,
    clamp,
    decode_key,
    encode_key,
    peer_key_problem,
    public_key,
    x25519,
)
from backends.wireguard.options import WireguardOptions, parse_options
from backends.wireguard.plan import plan, record_key
from backends.wireguard.uapi import (
    NO_KEY,
    DeviceState,
    PeerConfig,
    UapiError,
    check_errno,
    parse_get,
    set_request,
)
from flanneld.core.config import ConfigError, parse_config
from flanneld.core.lease import Lease, LeaseAttrs

H = bytes.fromhex


# -- options -----------------------------------------------------------------------------------
def test_options_default_to_the_references():
    assert parse_options({"Type": "wireguard"}) == WireguardOptions(
        51820, 51821, 0, None, "separate"
    )


def test_options_in_any_case_and_zero_port_is_the_default():
    psk = encode_key(bytes(range(32)))
    opts = parse_options(
        {"listenport": 0, "LISTENPORTV6": 6000, "persistentKeepaliveInterval": 25, "psk": psk,
         "mode": "Auto"}
    )  # fmt: skip
    assert opts == WireguardOptions(51820, 6000, 25, bytes(range(32)), "auto")


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"ListenPort": 70000}, "Backend.ListenPort"),
        ({"ListenPort": "51820"}, "Backend.ListenPort"),
        ({"PersistentKeepaliveInterval": -1}, "Backend.PersistentKeepaliveInterval"),
        ({"PSK": "not base64!"}, "Backend.PSK"),
        ({"PSK": base64.b64encode(b"short").decode()}, "Backend.PSK"),
        ({"PSK": 5}, "Backend.PSK"),
        ({"Mode": "both"}, "Backend.Mode"),
    ],
)
def test_bad_options_name_the_key(options, names):
    with pytest.raises(ConfigError, match=names):
        parse_options(options)


def test_the_config_check_runs_the_backends_option_check():
    from backends import checked_config

    ok = b'{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "ListenPort": 5000}}'
    assert checked_config(ok).backend_type == "wireguard"
    with pytest.raises(ConfigError, match="Backend.Mode"):
        checked_config(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Mode": 1}}')
    assert get_backend("WireGuard") is WireguardBackend


# -- keys --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scalar", "u", "out"),
    [  # RFC 7748 section 5.2
        ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
         "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
         "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
        ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
         "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
         "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
    ],
)  # fmt: skip
def test_x25519_rfc7748_vectors(scalar, u, out):
    assert x25519(H(scalar), H(u)) == H(out)


def test_x25519_rfc7748_iterated_1000():
    k = u = (9).to_bytes(32, "little")
    for i in range(1000):
        k, u = x25519(k, u), k
        if i == 0:
            assert k == H("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
    assert k == H("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")


def test_x25519_rfc7748_diffie_hellman():
    alice = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_key(alice) == H(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert public_key(bob) == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert x25519(alice, public_key(bob)) == x25519(bob, public_key(alice)) == shared


def test_key_spellings_and_bad_keys():
    key = os.urandom(32)
    assert decode_key(encode_key(key)) == key
    assert decode_key(encode_key(key) + "\n") == key  # as a key file holds it
    for bad in ("", "abc", encode_key(key)[:-2], encode_key(key + b"x"), "!" * 44):
        with pytest.raises(BadKey):
            decode_key(bad)
    assert peer_key_problem(bytes(32)) and peer_key_problem((1).to_bytes(32, "little"))
    assert peer_key_problem(bytes(31) + b"\x80")  # 2^255: zero once the top bit is masked
    assert not peer_key_problem(public_key(key))


def test_clamp_is_what_x25519_uses():
    key = clamp(os.urandom(32))
    assert key[0] & 7 == 0 and key[31] & 0x80 == 0 and key[31] & 0x40


# -- the key file ------------------------------------------------------------------------------
def test_key_file_made_once_mode_0400_and_kept(tmp_path):
    path = key_path({}, tmp_path)
    assert path == tmp_path / "wgkey"
    key, created = load_or_create(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o400
    assert decode_key(path.read_text()) == key
    again, created = load_or_create(path)
    assert (again, created) == (key, False)


def test_key_file_from_the_environment_and_loose_mode_tightened(tmp_path):
    path = tmp_path / "elsewhere" / "key"
    assert key_path({"WIREGUARD_KEY_FILE": str(path)}, tmp_path) == path
    key, _ = load_or_create(path)
    path.chmod(0o644)
    assert load_or_create(path) == (key, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


def test_a_broken_key_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "wgkey"
    path.write_text("garbage\n")
    path.chmod(0o400)
    with pytest.raises(BackendError, match="delete it"):
        load_or_create(path)


def test_psk_file(tmp_path):
    assert load_psk({}) is None
    psk = os.urandom(32)
    (tmp_path / "psk").write_text(encode_key(psk))
    assert load_psk({"WIREGUARD_PSK_FILE": str(tmp_path / "psk")}) == psk
    (tmp_path / "bad").write_text("x")
    with pytest.raises(BackendError, match="WIREGUARD_PSK_FILE"):
        load_psk({"WIREGUARD_PSK_FILE": str(tmp_path / "bad")})


# -- the UAPI codec ----------------------------------------------------------------------------
K1, K2, PSK = bytes([1] * 32), bytes([2] * 32), bytes([7] * 32)
N1, N2 = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
P1 = PeerConfig(K1, (IPv4Address("192.0.2.11"), 51820), frozenset({N1}), 25, PSK)
P2 = PeerConfig(K2, (IPv4Address("192.0.2.12"), 51820), frozenset({N2}))

GET_ANSWER = (
    f"private_key={'aa' * 32}\nlisten_port=51820\n"
    f"public_key={K1.hex()}\npreshared_key={PSK.hex()}\nprotocol_version=1\n"
    "endpoint=192.0.2.11:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
    "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=25\nallowed_ip=10.244.1.0/24\n"
    f"public_key={K2.hex()}\npreshared_key={NO_KEY.hex()}\nendpoint=192.0.2.12:51820\n"
    "persistent_keepalive_interval=0\nallowed_ip=10.244.2.0/24\n"
    "errno=0\n\n"
)


def test_get_answer_parsed():
    state = parse_get(GET_ANSWER)
    assert state == DeviceState(bytes([0xAA] * 32), 51820, {K1: P1, K2: P2})


def test_get_answer_without_peers_or_endpoint():
    state = parse_get(f"public_key={K1.hex()}\nallowed_ip=10.244.1.0/24\nerrno=0\n\n")
    assert state.peers[K1].endpoint is None and state.private_key == NO_KEY
    assert parse_get("errno=0\n\n") == DeviceState()


@pytest.mark.parametrize(
    "answer",
    ["errno=22\n\n", "listen_port=1\n\n", "", "public_key=zz\nerrno=0\n\n", "garbage\nerrno=0\n\n"],
)
def test_bad_answers_raise(answer):
    with pytest.raises(UapiError):
        parse_get(answer)


def test_errno_kept():
    with pytest.raises(UapiError) as info:
        check_errno("errno=98\n\n")
    assert info.value.errno == 98


def test_set_request_spelled_as_the_protocol():
    text = set_request(bytes([0xAA] * 32), 51820, remove=[K2], upsert=[P1]).decode()
    assert text == (
        f"set=1\nprivate_key={'aa' * 32}\nlisten_port=51820\n"
        f"public_key={K2.hex()}\nremove=true\n"
        f"public_key={K1.hex()}\npreshared_key={PSK.hex()}\nendpoint=192.0.2.11:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.244.1.0/24\n\n"
    )
    assert set_request().decode() == "set=1\n\n"


def test_a_set_read_back_gives_the_same_peers():
    """What `set_request` writes, a device's `get` gives back the same (round trip)."""
    body = set_request(upsert=[P1, P2]).decode().replace("set=1\n", "").rstrip("\n")
    lines = [ln for ln in body.split("\n") if ln != "replace_allowed_ips=true"]
    state = parse_get("\n".join(lines) + "\nerrno=0\n\n")
    assert state.peers == {K1: P1, K2: P2}


# -- the plan ----------------------------------------------------------------------------------
OWN = os.urandom(32)
OURS = Lease(
    N1,
    LeaseAttrs(IPv4Address("192.0.2.11"), "wireguard", {"PublicKey": encode_key(public_key(OWN))}),
)


def wg(net: str, ip: str, data: object, created: int = 0, backend: str = "wireguard") -> Lease:
    return Lease(
        IPv4Network(net), LeaseAttrs(IPv4Address(ip), backend, data), create_revision=created
    )


def key_of(n: int) -> bytes:
    return public_key(bytes([n]) * 32)


def test_plan_one_peer_per_lease():
    peers = {
        IPv4Network("10.244.2.0/24"): wg(
            "10.244.2.0/24", "192.0.2.12", {"PublicKey": encode_key(key_of(2))}
        ),
        IPv4Network("10.244.3.0/24"): wg(
            "10.244.3.0/24", "192.0.2.13", {"publickey": encode_key(key_of(3))}
        ),
    }
    planned, warnings = plan(OURS, peers, 51820, 25, PSK)
    assert warnings == []
    assert planned == {
        PeerConfig(
            key_of(2),
            (IPv4Address("192.0.2.12"), 51820),
            frozenset({IPv4Network("10.244.2.0/24")}),
            25,
            PSK,
        ),
        PeerConfig(
            key_of(3),
            (IPv4Address("192.0.2.13"), 51820),
            frozenset({IPv4Network("10.244.3.0/24")}),
            25,
            PSK,
        ),
    }


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (None, "no PublicKey"),
        ({}, "no PublicKey"),
        ("text", "no PublicKey"),
        ({"PublicKey": 5}, "not a string"),
        ({"PublicKey": "not base64"}, "not base64"),
        ({"PublicKey": base64.b64encode(b"x" * 31).decode()}, "31 bytes"),
        ({"PublicKey": encode_key(bytes(32))}, "small order"),
    ],
)
def test_hostile_records_skipped_with_the_fix_others_kept(data, why):
    good = wg("10.244.3.0/24", "192.0.2.13", {"PublicKey": encode_key(key_of(3))})
    bad = wg("10.244.4.0/24", "192.0.2.14", data)
    planned, warnings = plan(OURS, {good.subnet: good, bad.subnet: bad}, 51820)
    assert {p.public_key for p in planned} == {key_of(3)}
    [warning] = warnings
    assert "10.244.4.0/24" in warning and why in warning and "restart the agent" in warning


def test_a_copied_key_stays_with_the_older_lease_and_ours_with_us():
    older = wg("10.244.3.0/24", "192.0.2.13", {"PublicKey": encode_key(key_of(3))}, created=5)
    copy = wg("10.244.4.0/24", "192.0.2.14", {"PublicKey": encode_key(key_of(3))}, created=9)
    thief = wg("10.244.5.0/24", "192.0.2.15", OURS.attrs.backend_data, created=1)
    peers = {le.subnet: le for le in (older, copy, thief)}
    planned, warnings = plan(OURS, peers, 51820)
    assert [p.allowed_ips for p in planned] == [frozenset({older.subnet})]
    assert len(warnings) == 2 and all("a key of its own" in w for w in warnings)


def test_other_backends_and_our_own_lease_skipped():
    vx = wg("10.244.3.0/24", "192.0.2.13", {"VtepMAC": "0a:00:00:00:00:01"}, backend="vxlan")
    planned, warnings = plan(OURS, {vx.subnet: vx, OURS.subnet: OURS}, 51820)
    assert planned == set() and len(warnings) == 2


def test_record_key():
    assert record_key({"PublicKey": encode_key(key_of(2))}) == (key_of(2), "")


def test_a_changed_key_is_a_new_peer_and_the_old_one_removed():
    """The diff the backend applies when a node comes back with a new key: the old key's peer
    removed, the new one added, for the same subnet."""
    lease_a = wg("10.244.3.0/24", "192.0.2.13", {"PublicKey": encode_key(key_of(3))})
    lease_b = wg("10.244.3.0/24", "192.0.2.13", {"PublicKey": encode_key(key_of(4))})
    before, _ = plan(OURS, {lease_a.subnet: lease_a}, 51820)
    after, _ = plan(OURS, {lease_b.subnet: lease_b}, 51820)
    change = diff(after, before)
    assert {p.public_key for p in change.upsert} == {key_of(4)}
    assert {p.public_key for p in change.remove} == {key_of(3)}
    moved = wg("10.244.3.0/24", "192.0.2.99", {"PublicKey": encode_key(key_of(3))})
    endpoint_only, _ = plan(OURS, {moved.subnet: moved}, 51820)
    change = diff(endpoint_only, before)
    assert not change.remove and {p.public_key for p in change.upsert} == {key_of(3)}


def _dual(net: str, net6: str, ip: str, ip6: str | None, data6: object) -> Lease:
    from ipaddress import IPv6Address, IPv6Network

    key = encode_key(key_of(int(ip.rsplit(".", 1)[1])))
    attrs = LeaseAttrs(
        IPv4Address(ip), "wireguard", {"PublicKey": key},
        IPv6Address(ip6) if ip6 else None, data6,
    )  # fmt: skip
    return Lease(IPv4Network(net), attrs, ipv6_subnet=IPv6Network(net6))


def test_plan_for_the_ipv6_device():
    from ipaddress import IPv6Address, IPv6Network

    local = _dual("10.244.1.0/24", "fd00:10:244:1::/64", "192.0.2.11", "fd00:192::11", None)
    good = _dual(
        "10.244.2.0/24", "fd00:10:244:2::/64", "192.0.2.12", "fd00:192::12",
        {"PublicKey": encode_key(key_of(12))},
    )  # fmt: skip
    no_ip6 = _dual("10.244.3.0/24", "fd00:10:244:3::/64", "192.0.2.13", None, None)
    bad = _dual(
        "10.244.4.0/24", "fd00:10:244:4::/64", "192.0.2.14", "fd00:192::14", {"PublicKey": "x"}
    )
    peers = {p.subnet: p for p in (good, no_ip6, bad)}
    planned, warnings = plan(local, peers, 51821, version=6)
    assert planned == {
        PeerConfig(
            key_of(12), (IPv6Address("fd00:192::12"), 51821),
            frozenset({IPv6Network("fd00:10:244:2::/64")}),
        )
    }  # fmt: skip
    assert len(warnings) == 2
    assert any("10.244.3.0/24" in w and "PublicIPv6" in w for w in warnings)
    assert any("10.244.4.0/24" in w and "not base64" in w for w in warnings)
    text = set_request(upsert=planned).decode()
    assert "endpoint=[fd00:192::12]:51821\n" in text  # bracketed, as the UAPI wants it
    v4, warnings4 = plan(local, peers, 51820, version=4)
    assert len(v4) == 3 and warnings4 == []  # the IPv4 halves are all fine


@pytest.mark.parametrize(
    ("backend", "ip6", "refused"),
    [
        ('{"Type": "wireguard", "Mode": "auto"}', None, "no global IPv6 address"),
        ('{"Type": "wireguard"}', None, "no global IPv6 address"),
    ],
)
def test_dual_stack_refusals_before_anything_is_touched(tmp_path, backend, ip6, refused):
    import asyncio
    from ipaddress import IPv6Address

    from backends.base import BackendContext
    from flanneld.core.interfaces import ExternalInterface

    config = parse_config(
        '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",'
        f' "Backend": {backend}}}'
    )
    v4 = IPv4Address("192.0.2.11")
    v6 = IPv6Address(ip6) if ip6 else None
    ext = ExternalInterface("eth0", 2, v4, v4, 1500, None, v6, v6)
    backend = WireguardBackend(BackendContext(ext, config, tmp_path, config.backend))
    with pytest.raises((BackendError, ConfigError), match=refused):
        asyncio.run(backend.prepare())
    assert backend.mtu == 1420 and not (tmp_path / "wgkey").exists()


# -- the kernel path's messages ------------------------------------------------------------------
def test_kernel_peer_read_back_from_the_generic_netlink_message():
    """No kernel WireGuard here: what pyroute2 encodes for a peer (as `KernelDevice.set` asks
    it to), decoded as a dump would be, reads back as the same PeerConfig."""
    from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

    from backends.wireguard.kerneldev import _peer

    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "flannel-wg"])
    spec = {
        "public_key": encode_key(K1),
        "preshared_key": encode_key(PSK),
        "endpoint_addr": "192.0.2.11",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.244.1.0/24"],
    }
    AsyncWireGuard._wg_set_peer(AsyncWireGuard.__new__(AsyncWireGuard), msg, spec)
    msg.encode()
    dumped = wgmsg(msg.data)
    dumped.decode()
    [nla] = dumped.get_attr("WGDEVICE_A_PEERS")
    assert _peer(nla) == P1
