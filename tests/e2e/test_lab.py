"""The namespace lab itself: nodes, underlay, etcd on the switch, containers behind cni0, routed
second segment, and that every namespace and process is gone afterwards."""

import os
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
