"""The namespace lab itself: nodes, underlay, etcd on the switch, containers behind cni0, routed
second segment, and that every namespace and process is gone afterwards."""

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab import Lab, namespaces

ROOT = Path(__file__).resolve().parents[2]


def _namespaces() -> set[str]:
    return set(namespaces())


def _netns_usable() -> bool:
    probe = f"flprobe{secrets.token_hex(3)}"
    if (
        subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode
        != 0
    ):
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return True


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root to create network namespaces"),
    pytest.mark.skipif(
        os.geteuid() == 0 and not _netns_usable(),
        reason="`ip netns add` does not work here",
    ),
]

HEALTH = (  # run inside a namespace: etcd's health as seen over the underlay
    "import urllib.request as u; "
    "print(u.urlopen('http://192.0.2.1:2379/health', timeout=3).read().decode())"
)


def _mine(prefix: str) -> set[str]:
    return {ns for ns in _namespaces() if ns.startswith(f"{prefix}-")}


@pytest.fixture(scope="module")
def lab():
    with Lab(nodes=3, containers=2) as lab:
        lab.start_etcd()
        yield lab
    assert not _mine(lab.prefix)


def test_nodes_have_underlay_and_reach_each_other(lab: Lab) -> None:
    assert {n.ns for n in lab.nodes} | {lab.switch_ns} == _mine(lab.prefix)
    for node in lab.nodes:
        route = lab.run(node.ns, "ip", "route", "show", "default").stdout
        assert route.split()[:5] == ["default", "via", "192.0.2.1", "dev", "eth0"]
        sysctl = lab.run(
            node.ns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"
        )
        assert sysctl.stdout.split() == ["1", "0"]
    assert [n.ip for n in lab.nodes] == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
    for src in lab.nodes:
        for dst in lab.nodes:
            assert lab.ping(src.ns, dst.ip), f"{src.name} -> {dst.name}"
    assert not lab.ping(lab.nodes[0].ns, "192.0.2.99", timeout=0.5)


def test_etcd_round_trip_reachable_from_nodes_and_survives_restart(lab: Lab) -> None:
    lab.etcdctl("put", "/lab/key", "value")
    assert lab.etcdctl("get", "--print-value-only", "/lab/key").strip() == "value"
    health = lab.run(lab.nodes[0].ns, sys.executable, "-c", HEALTH)
    assert '"health":"true"' in health.stdout

    lab.stop_etcd()
    assert lab.run(lab.nodes[0].ns, sys.executable, "-c", HEALTH, check=False).returncode != 0
    lab.start_etcd()
    assert lab.etcdctl("get", "--print-value-only", "/lab/key").strip() == "value"


def test_containers_reach_each_other_through_node_routes(lab: Lab) -> None:
    n1, n2, n3 = lab.nodes
    lab.attach_containers(n1, "10.244.1.1/24")
    lab.attach_containers(n2, "10.244.2.1/24", mtu=1450)
    assert [c.ip for c in n1.containers] == ["10.244.1.2", "10.244.1.3"]
    assert "mtu 1450" in lab.run(n2.containers[0].ns, "ip", "link", "show", "eth0").stdout
    assert not any(lab.ping_matrix().values())

    lab.run(n1.ns, "ip", "route", "add", "10.244.2.0/24", "via", n2.ip)
    lab.run(n2.ns, "ip", "route", "add", "10.244.1.0/24", "via", n1.ip)
    matrix = lab.ping_matrix()
    assert len(matrix) == 8 and all(matrix.values()), matrix

    before = list(n1.containers)
    lab.attach_containers(n1, "10.244.1.1/24")
    assert n1.containers == before

    lab.attach_containers(n3, "10.244.3.1/24")
    lab.attach_containers(n3, "10.244.7.1/24")
    assert [c.ip for c in n3.containers] == ["10.244.7.2", "10.244.7.3"]
    assert lab.ping(n3.containers[1].ns, "10.244.7.1")
    assert "10.244.7.1/24" in lab.run(n3.ns, "ip", "-br", "addr", "show", "cni0").stdout


def test_exit_deletes_namespaces_processes_and_workdir() -> None:
    with Lab(nodes=2) as lab:
        sleeper = lab.spawn(lab.nodes[0].ns, "sleep", "300")
        workdir = lab.workdir
        assert len(_mine(lab.prefix)) == 3
    assert not _mine(lab.prefix)
    assert sleeper.poll() is not None
    assert not workdir.exists()


def test_exit_removes_wireguard_socket_links_into_its_workdir(monkeypatch, tmp_path) -> None:
    """The wireguard backend's agents link their sockets into one host-wide directory: the
    lab removes the links that point into its workdir, and no other."""
    import deploy.lab

    run_dir = tmp_path / "wireguard"
    run_dir.mkdir()
    monkeypatch.setattr(deploy.lab, "WIREGUARD_RUN_DIR", run_dir)
    other = run_dir / "flannel-wg.other.sock"
    other.symlink_to(tmp_path / "someone-elses.sock")
    with Lab(nodes=1) as lab:
        ours = run_dir / "flannel-wg.sock"
        ours.symlink_to(lab.workdir / "n1" / "wireguard" / "flannel-wg.sock")
    assert not ours.is_symlink() and other.is_symlink()


def test_exception_inside_with_still_tears_down() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(nodes=2) as lab:
        lab.attach_containers(lab.nodes[0], "10.244.1.1/24")
        raise RuntimeError("boom")
    assert not _mine(lab.prefix)


def test_failed_build_cleans_up_but_spares_namespaces_it_did_not_create() -> None:
    prefix = f"fl{secrets.token_hex(3)}"
    foreign = f"{prefix}-n2"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(Exception, match="File exists"), Lab(nodes=3, prefix=prefix):
            pass
        assert _mine(prefix) == {foreign}
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


def test_interrupt_just_after_a_namespace_is_made_still_deletes_it(monkeypatch) -> None:
    # what CI hit: Ctrl-C landed after `ip netns add` had made the namespace but before the
    # lab had noted it, so the namespace outlived the lab
    import deploy.lab as lab_module

    prefix = f"fl{secrets.token_hex(3)}"
    real_sh = lab_module._sh

    def interrupted_sh(cmd, **kwargs):
        res = real_sh(cmd, **kwargs)
        if cmd[:3] == ["ip", "netns", "add"] and cmd[3] == f"{prefix}-n2":
            raise KeyboardInterrupt
        return res

    monkeypatch.setattr(lab_module, "_sh", interrupted_sh)
    with pytest.raises(KeyboardInterrupt), Lab(nodes=3, prefix=prefix):
        pass
    assert _mine(prefix) == set()


def test_remote_segment_is_routed_and_reaches_etcd() -> None:
    with Lab(nodes=3, remote_nodes={3}) as lab:
        n1, n2, n3 = lab.nodes
        assert n3.ip.startswith("198.18.")
        lab.start_etcd()
        assert lab.ping(n3.ns, n1.ip) and lab.ping(n1.ns, n3.ip) and lab.ping(n2.ns, n1.ip)
        assert "via 192.0.2.254" in lab.run(n1.ns, "ip", "route", "get", n3.ip).stdout
        assert '"health":"true"' in lab.run(n3.ns, sys.executable, "-c", HEALTH).stdout
    assert not _mine(lab.prefix)


def test_cleanup_command_deletes_only_its_prefix() -> None:
    lab = Lab(nodes=2)
    lab.__enter__()
    lookalike = f"{lab.prefix}x-n1"
    subprocess.run(["ip", "netns", "add", lookalike], check=True)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "deploy.lab", "cleanup", "--prefix", lab.prefix],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out.count("deleted") == 3
        assert not _mine(lab.prefix)
        assert lookalike in _namespaces()
    finally:
        lab.close()
        subprocess.run(["ip", "netns", "del", lookalike], check=True)


def test_aborted_process_tears_its_lab_down_at_exit() -> None:
    script = (
        "from deploy.lab import Lab; print(Lab(nodes=2).__enter__().prefix); raise SystemExit(3)"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 3 and res.stdout.strip(), res.stderr
    assert not _mine(res.stdout.strip())


def test_attach_containers_failing_part_way_leaves_nothing_and_can_be_retried() -> None:
    with Lab(nodes=1, containers=2) as lab:
        node = lab.nodes[0]
        blocker = f"{node.ns}c2"  # the second container's name, taken: its creation fails
        subprocess.run(["ip", "netns", "add", blocker], check=True)
        try:
            with pytest.raises(Exception, match="File exists"):
                lab.attach_containers(node, "10.244.1.1/24")
            assert node.containers == [] and node.subnet is None
            assert f"{node.ns}c1" not in namespaces()  # the first one was removed again
            links = lab.run(node.ns, "ip", "-br", "link").stdout
            assert "cni0" not in links and "vc1" not in links
            assert blocker in namespaces()  # not ours: left alone
        finally:
            subprocess.run(["ip", "netns", "del", blocker], check=False)
        lab.attach_containers(node, "10.244.1.1/24")  # the same subnet again: built now
        assert [c.ip for c in node.containers] == ["10.244.1.2", "10.244.1.3"]
        assert lab.ping(node.containers[1].ns, "10.244.1.1")


# -- the dual-stack lab (ipv6=True) ---------------------------------------------------------


def _root_network() -> tuple[str, ...]:
    """The root namespace's links, addresses and routes of both families (no lifetimes)."""
    outputs = []
    for cmd in (
        ["ip", "-br", "link"],
        ["ip", "-br", "addr"],
        ["ip", "-4", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout
        outputs.append(re.sub(r" expires \d+sec", "", out))
    return tuple(outputs)


def test_ipv6_underlay_reaches_every_node_also_across_the_router() -> None:
    root_before = _root_network()
    with Lab(nodes=3, ipv6=True, remote_nodes={3}) as lab:
        n1, n2, n3 = lab.nodes
        assert [n.ip6 for n in lab.nodes] == ["fd00:192::11", "fd00:192::12", "fd00:198::13"]
        assert [n.ip for n in lab.nodes] == ["192.0.2.11", "192.0.2.12", "198.18.0.13"]
        for node in lab.nodes:
            addrs = lab.run(node.ns, "ip", "-6", "-br", "addr", "show", "dev", "eth0").stdout
            assert f"{node.ip6}/64" in addrs and "tentative" not in addrs, addrs
            sysctl = lab.run(
                node.ns,
                "sysctl",
                "-n",
                "net.ipv6.conf.all.forwarding",
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.eth0.accept_dad",
                "net.ipv6.conf.eth0.disable_ipv6",
            )
            assert sysctl.stdout.split() == ["1", "0", "0", "0"], node.name
        default6 = lab.run(n3.ns, "ip", "-6", "route", "show", "default").stdout
        assert default6.split()[:5] == ["default", "via", "fd00:198::254", "dev", "eth0"]
        assert "fd00:192::1/64" in lab.run(lab.switch_ns, "ip", "-br", "addr").stdout
        for src in lab.nodes:
            for dst in lab.nodes:
                assert lab.ping(src.ns, dst.ip6), f"{src.name} -> {dst.name} over IPv6"
                assert lab.ping(src.ns, dst.ip), f"{src.name} -> {dst.name} over IPv4"
        assert "via fd00:192::254" in lab.run(n1.ns, "ip", "route", "get", n3.ip6).stdout
        assert lab.ping(lab.switch_ns, n3.ip6)  # where etcd lives: back through the router
        assert not lab.ping(n1.ns, "fd00:192::99", timeout=0.5)
        assert not lab.ping(n1.ns, "fd00:198::99", timeout=0.5)
        assert lab.ping_matrix(family=6) == {}  # no containers yet
    assert not _mine(lab.prefix)
    assert _root_network() == root_before  # nothing added to or changed in the root namespace


def test_ipv6_containers_reach_cni0_and_through_node_routes() -> None:
    with Lab(nodes=3, containers=2, ipv6=True) as lab:
        n1, n2, n3 = lab.nodes
        lab.attach_containers(n1, "10.244.1.1/24", subnet6_cidr="fd00:10:244:1::1/64")
        lab.attach_containers(n2, "10.244.2.1/24", mtu=1450, subnet6_cidr="fd00:10:244:2::1/64")
        lab.attach_containers(n3, "10.244.3.1/24")  # IPv4 only: no IPv6 address, not pinged
        assert [(c.ip, c.ip6) for c in n1.containers] == [
            ("10.244.1.2", "fd00:10:244:1::2"),
            ("10.244.1.3", "fd00:10:244:1::3"),
        ]
        assert n1.subnet6 == "fd00:10:244:1::1/64" and n3.subnet6 is None
        assert [c.ip6 for c in n3.containers] == [None, None]
        assert "fd00:10:244:1::1/64" in lab.run(n1.ns, "ip", "-br", "addr", "show", "cni0").stdout
        for node in (n1, n2):
            for c in node.containers:
                route = lab.run(c.ns, "ip", "-6", "route", "show", "default").stdout
                assert route.split()[:3] == ["default", "via", str(node.subnet6).split("/")[0]]
                assert "tentative" not in lab.run(c.ns, "ip", "-6", "addr").stdout
                assert lab.ping(c.ns, str(node.subnet6).split("/")[0]), c.ns
                assert lab.ping(c.ns, str(node.subnet).split("/")[0]), c.ns
        assert "mtu 1450" in lab.run(n2.containers[0].ns, "ip", "link", "show", "eth0").stdout

        matrix6 = lab.ping_matrix(family=6)
        assert len(matrix6) == 8 and not any(matrix6.values())  # no routes between the nodes
        lab.run(n1.ns, "ip", "route", "add", "fd00:10:244:2::/64", "via", n2.ip6)
        lab.run(n2.ns, "ip", "route", "add", "fd00:10:244:1::/64", "via", n1.ip6)
        matrix6 = lab.ping_matrix(family=6)
        assert len(matrix6) == 8 and all(matrix6.values()), matrix6
        assert {dst for _, dst in matrix6} == {
            "fd00:10:244:1::2",
            "fd00:10:244:1::3",
            "fd00:10:244:2::2",
            "fd00:10:244:2::3",
        }
        assert not any(lab.ping_matrix(family=4).values())  # IPv4 has no routes: its own grid

        before = list(n1.containers)
        lab.attach_containers(n1, "10.244.1.1/24", subnet6_cidr="fd00:10:244:1::1/64")
        assert n1.containers == before  # the same subnets: nothing rebuilt
        lab.attach_containers(n1, "10.244.1.1/24", subnet6_cidr="fd00:10:244:9::1/64")
        assert [c.ip6 for c in n1.containers] == ["fd00:10:244:9::2", "fd00:10:244:9::3"]
        assert lab.ping(n1.containers[1].ns, "fd00:10:244:9::1")
        addrs = lab.run(n1.ns, "ip", "-br", "addr", "show", "cni0").stdout
        assert "fd00:10:244:9::1/64" in addrs and "fd00:10:244:1::1/64" not in addrs
        with pytest.raises(ValueError, match="family"):
            lab.ping_matrix(family=5)
    assert not _mine(lab.prefix)


def test_ipv4_lab_has_no_ipv6_addresses() -> None:
    with Lab(nodes=2) as lab:
        assert [n.ip6 for n in lab.nodes] == [None, None]
        lab.attach_containers(lab.nodes[0], "10.244.1.1/24")
        assert lab.nodes[0].containers[0].ip6 is None
        assert lab.ping_matrix(family=6) == {}
        global6 = lab.run(lab.nodes[0].ns, "ip", "-6", "addr", "show", "scope", "global").stdout
        assert global6 == ""
    assert not _mine(lab.prefix)
