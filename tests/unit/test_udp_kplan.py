"""The udp kernel fast path's pure half: map encodings from `Routes`, map diffs, the loader's
ld_imm64 patching, the env switch; and that the embedded bytecode is what the shipped build
script makes of the shipped C source."""

from __future__ import annotations

import shutil
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from backends.udp import bpfcode
from backends.udp.core import Peer, Routes
from backends.udp.kplan import (
    CONFIG_SIZE,
    ROUTE_KEY_SIZE,
    ROUTE_VALUE_SIZE,
    STATS,
    STATS_SLOTS,
    KernelSetting,
    changes,
    config_value,
    kernel_too_old,
    kernel_wanted,
    patch_map_fds,
    route_entries,
    route_key,
    stats_values,
)

N = IPv4Network
A = IPv4Address


def snapshot(*peers: Peer, port: int = 8285) -> Routes:
    return Routes(N("10.244.0.0/16"), 24, N("10.244.1.0/24"), peers, port)


def test_route_entries_are_prefix_and_subnet_to_peer_ip_port_and_kernel_flag():
    routes = snapshot(
        Peer(N("10.244.2.0/24"), A("192.0.2.12"), 9000, kernel=True),
        Peer(N("10.244.8.0/21"), A("192.0.2.13"), 9000),
    )
    entries = route_entries(routes)
    assert entries == {
        bytes([24, 0, 0, 0, 10, 244, 2, 0]): bytes([192, 0, 2, 12]) + struct.pack("<II", 9000, 1),
        bytes([21, 0, 0, 0, 10, 244, 8, 0]): bytes([192, 0, 2, 13]) + struct.pack("<II", 9000, 0),
    }
    assert all(len(k) == ROUTE_KEY_SIZE and len(v) == ROUTE_VALUE_SIZE for k, v in entries.items())


def test_no_peers_no_entries():
    assert route_entries(snapshot()) == {}


def test_config_value_layout_matches_the_c_struct():
    v = config_value(A("192.0.2.11"), N("10.244.1.0/24"), 7, 9, 8285)
    assert len(v) == CONFIG_SIZE
    assert v[:12] == bytes([192, 0, 2, 11, 10, 244, 1, 0, 255, 255, 255, 0])
    assert struct.unpack("<III", v[12:]) == (7, 9, 8285)


def test_changes_add_replace_delete():
    k1, k2, k3 = (
        route_key(N("10.0.1.0/24")),
        route_key(N("10.0.2.0/24")),
        route_key(N("10.0.3.0/24")),
    )
    old = {k1: b"a", k2: b"b"}
    new = {k2: b"B", k3: b"c"}
    assert changes(old, new) == ({k2: b"B", k3: b"c"}, [k1])
    assert changes(new, new) == ({}, [])
    assert changes({}, new) == (new, [])
    assert changes(new, {}) == ({}, sorted(new))


def ld_imm64(dst: int, imm: int = 0) -> tuple[int, int]:
    return (0x18 | dst << 8 | (imm & 0xFFFFFFFF) << 32, 0)


def test_patch_points_ld_imm64_at_the_map_fd():
    mov = 0x00000000000016BF  # r6 = r1
    lo, hi = ld_imm64(2)
    exit_ = 0x95
    out = patch_map_fds([mov, lo, hi, exit_], [(1, "m")], {"m": 42})
    words = struct.unpack("<4Q", out)
    assert words[0] == mov and words[3] == exit_
    assert words[1] & 0xFF == 0x18
    assert (words[1] >> 8) & 0x0F == 2  # dst register kept
    assert (words[1] >> 12) & 0x0F == 1  # src_reg = BPF_PSEUDO_MAP_FD
    assert words[1] >> 32 == 42
    assert words[2] == 0


def test_patch_refuses_a_relocation_not_on_ld_imm64():
    with pytest.raises(ValueError, match="not on an ld_imm64"):
        patch_map_fds([0x95, 0], [(0, "m")], {"m": 3})


def test_embedded_relocations_are_all_on_ld_imm64_of_known_maps():
    for insns, relocs in (
        (bpfcode.EGRESS_INSNS, bpfcode.EGRESS_MAP_RELOCS),
        (bpfcode.INGRESS_INSNS, bpfcode.INGRESS_MAP_RELOCS),
    ):
        assert relocs
        for idx, name in relocs:
            assert insns[idx] & 0xFF == 0x18
            assert name in ("cfg_map", "route_map", "stats_map")
        patch_map_fds(insns, relocs, {"cfg_map": 3, "route_map": 4, "stats_map": 5})


def test_stats_values_name_every_slot():
    assert len(STATS) <= STATS_SLOTS
    got = stats_values(list(range(STATS_SLOTS)))
    assert got["kernel:encapsulated"] == 0 and got["kernel:decapsulated"] == 4
    assert list(got) == [f"kernel:{s}" for s in STATS]


@pytest.mark.parametrize(
    ("env", "want"),
    [({}, True), ({"FLANNELD_UDP_KERNEL": "false"}, False), ({"FLANNELD_UDP_KERNEL": "1"}, True)],
)
def test_kernel_switch(env, want):
    assert kernel_wanted(env) is want


def test_kernel_switch_refuses_garbage():
    with pytest.raises(KernelSetting, match="FLANNELD_UDP_KERNEL"):
        kernel_wanted({"FLANNELD_UDP_KERNEL": "perhaps"})


def test_the_c_struct_enum_lists_the_stats_in_order():
    from deploy.build_bpf import SOURCE

    text = SOURCE.read_text()
    enum = text[text.index("enum { ST_") : text.index("};", text.index("enum { ST_"))]
    names = [w.strip().removeprefix("ST_").lower() for w in enum[6:].split(",") if w.strip()]
    assert names == list(STATS)


@pytest.mark.skipif(
    shutil.which("clang-14") is None,
    reason="clang-14 not installed: the embedded bytecode cannot be rebuilt here",
)
def test_embedded_bytecode_is_what_the_build_script_makes_of_the_c_source():
    from deploy.build_bpf import OUTPUT, build

    assert OUTPUT.read_text() == build(), "run: python deploy/build_bpf.py"


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v857", True), ("6.3.0", True), ("7.0.1", True), ("6.2.16-arch", False),
     ("5.15.0-91-generic", False), ("weird", False)],
)  # fmt: skip
def test_kernel_version_gate(release, ok):
    assert (kernel_too_old(release) is None) is ok


# -- the plan when the fast path runs ---------------------------------------------------------


def _lease(subnet: str, ip: str, data: object = None):
    from flanneld.core.lease import Lease, LeaseAttrs

    return Lease(N(subnet), LeaseAttrs(A(ip), "", data))


def test_plan_marks_fast_path_peers_and_without_own_caps_uses_none_of_theirs():
    from backends.udp import plan

    local = _lease("10.244.1.0/24", "192.0.2.11")
    peers = {
        N("10.244.2.0/24"): _lease("10.244.2.0/24", "192.0.2.12", {"Cap": ["csum", "train"]}),
        N("10.244.3.0/24"): _lease("10.244.3.0/24", "192.0.2.13", {"datapath": "kernel"}),
        N("10.244.4.0/24"): _lease("10.244.4.0/24", "192.0.2.14"),  # the reference's
        N("10.244.5.0/24"): _lease("10.244.5.0/24", "192.0.2.15", {"Datapath": "Kernel"}),
    }
    network = N("10.244.0.0/16")
    with_caps, _ = plan(local, peers, network, 24, 8285)
    without, _ = plan(local, peers, network, 24, 8285, caps=False)
    assert [(p.partial_csum, p.train, p.kernel) for p in with_caps.peers] == [
        (True, True, False),
        (False, False, True),
        (False, False, False),
        (False, False, False),  # the value is matched exactly
    ]
    # a node advertising no Cap is a reference node to its peers: it sends as one
    assert [(p.partial_csum, p.train, p.kernel) for p in without.peers] == [
        (False, False, False),
        (False, False, True),
        (False, False, False),
        (False, False, False),
    ]
