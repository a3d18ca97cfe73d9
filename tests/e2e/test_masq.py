"""Masquerade rules in a lab node, iptables and nftables: the exact rule set, resync after a
deleted or moved rule, switching modes, and a cleanup that leaves the tables as they were; on a
dual-stack node the same for IPv6 (ip6tables, table ip6 flannel-ipv6).

Every iptables/nft command runs inside the node's namespace (`ip netns exec`), never outside.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys

import pytest

from deploy.lab import Lab

from .cluster import need_lab

NET, SUBNET = "10.244.0.0/16", "10.244.3.0/24"
COMMENT = '-m comment --comment "flanneld masq"'
FWD_COMMENT = '-m comment --comment "flanneld forward"'
MASQ = "-j MASQUERADE --random-fully"
NAT_RULES = [
    f"-A POSTROUTING {COMMENT} -j FLANNEL-POSTRTG",
    f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s 10.244.3.0/24 -d 10.244.0.0/16 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.3.0/24 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.3.0/24 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {COMMENT} {MASQ}",
    f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {COMMENT} {MASQ}",
]
FILTER_RULES = [
    f"-A FORWARD {FWD_COMMENT} -j FLANNEL-FWD",
    f"-A FLANNEL-FWD -s 10.244.0.0/16 {FWD_COMMENT} -j ACCEPT",
    f"-A FLANNEL-FWD -d 10.244.0.0/16 {FWD_COMMENT} -j ACCEPT",
]
M, F = 'comment "flanneld masq"', 'comment "flanneld forward"'
NFT_TABLE = f"""table ip flannel-ipv4 {{
	chain postrtg {{
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return {M}
		ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return {M}
		ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return {M}
		ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return {M}
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random {M}
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random {M}
	}}

	chain forward {{
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept {F}
		ip daddr 10.244.0.0/16 accept {F}
	}}
}}"""
# rules somebody else (docker, kube-proxy) has on the node, which must survive us
FOREIGN = """*nat
:DOCKER - [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -o docker0 -j ACCEPT
COMMIT
"""
FOREIGN_NFT = "table inet other { chain c { type filter hook forward priority 10; }; }\n"

pytestmark = [pytest.mark.root]


@pytest.fixture
def node():
    """A fresh one-node lab per test: a node whose tables nobody has touched."""
    need_lab()
    with Lab(nodes=1, containers=0) as lab:
        yield lab, lab.nodes[0].ns


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (deploy/run-tests.sh installs it)")


def masq(node, command: str, *args: str, mode: str | None = None, dual: bool = False):
    lab, ns = node
    extra = [] if command == "cleanup" else ["--network", NET, "--subnet", SUBNET]
    if dual and command != "cleanup":
        extra += ["--network6", NET6, "--subnet6", SUBNET6]
    extra += ["--mode", mode] if mode else []
    cmd = (sys.executable, "-m", "flanneld.face.ctl", "rules", command)
    return lab.run(ns, *cmd, *extra, *args, check=False)


def ipt(node, *args: str) -> None:
    lab, ns = node
    lab.run(ns, "iptables", *args)


def rules(node, table: str) -> list[str]:
    lab, ns = node
    out = lab.run(ns, "iptables-save", "-t", table).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


def nft_table(node) -> str:
    lab, ns = node
    return lab.run(ns, "nft", "list", "table", "ip", "flannel-ipv4").stdout.strip()


def snapshot(node) -> str:
    """Every table of the node as iptables-save and nft see them, minus timestamps/counters."""
    lab, ns = node
    text = lab.run(ns, "iptables-save").stdout
    if shutil.which("ip6tables-save"):
        text += "\n--- ip6tables\n" + lab.run(ns, "ip6tables-save").stdout
    if shutil.which("nft"):
        text += "\n--- nft\n" + lab.run(ns, "nft", "list", "ruleset").stdout
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r"\[\d+:\d+\]|packets \d+ bytes \d+", "0", text)


# -- iptables -----------------------------------------------------------------------------------


def test_iptables_exact_rule_set_and_idempotent(node):
    need("iptables")
    assert masq(node, "ensure", mode="iptables").returncode == 0
    assert rules(node, "nat") == NAT_RULES
    assert rules(node, "filter") == FILTER_RULES
    first = snapshot(node)
    assert masq(node, "ensure", mode="iptables").returncode == 0
    assert snapshot(node) == first  # no duplicates, same order
    res = masq(node, "check", mode="iptables")
    assert res.returncode == 0 and res.stdout.strip() == "in sync"


def test_iptables_resync_restores_deleted_rules_and_order(node):
    need("iptables")
    masq(node, "ensure", mode="iptables")
    ipt(node, "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")  # a deleted rule
    ipt(node, "-t", "nat", "-D", "FLANNEL-POSTRTG", "1")  # the first one moved to the end
    ipt(node, "-t", "nat", "-A", "FLANNEL-POSTRTG", *shlex.split(NAT_RULES[1])[2:])
    ipt(node, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
    ipt(node, "-t", "nat", "-A", "POSTROUTING", *shlex.split(NAT_RULES[0])[2:])  # a duplicate jump
    ipt(node, "-t", "filter", "-D", "FORWARD", "1")  # the forward jump gone
    assert masq(node, "check", mode="iptables").returncode == 1
    res = masq(node, "resync", mode="iptables")
    assert res.returncode == 0
    assert res.stderr.count("masquerade rules repaired") == 1
    # of the two jumps the one below the stranger's rule stays; it is not moved to the top
    assert rules(node, "nat") == ["-A POSTROUTING -o eth0 -j MASQUERADE", *NAT_RULES]
    assert rules(node, "filter") == FILTER_RULES
    again = masq(node, "resync", mode="iptables")
    assert again.returncode == 0 and "repaired" not in again.stderr


def test_iptables_new_subnet_replaces_the_old_rules(node):
    need("iptables")
    masq(node, "ensure", mode="iptables")
    lab, ns = node
    cmd = [sys.executable, "-m", "flanneld.face.ctl", "rules", "ensure", "--network", NET]
    lab.run(ns, *cmd, "--subnet", "10.244.9.0/24", "--mode", "iptables", "--no-forward")
    nat = rules(node, "nat")
    assert len(nat) == 7 and not any("10.244.3.0" in r for r in nat)
    assert sum("10.244.9.0/24" in r for r in nat) == 3
    assert rules(node, "filter") == []


# An admin's rules and Docker's jump, there before flannel starts: they must stay above ours.
ADMIN_FILTER = [
    ["-I", "FORWARD", "1", "-s", "192.0.2.66", "-j", "DROP"],
    ["-A", "FORWARD", "-j", "DOCKER-USER"],
]
ADMIN_NAT = [
    ["-I", "POSTROUTING", "1", "-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE"]
]


def test_iptables_jumps_are_appended_below_rules_already_there_and_left_there(node):
    need("iptables")
    ipt(node, "-N", "DOCKER-USER")
    for args in ADMIN_FILTER:
        ipt(node, *args)
    for args in ADMIN_NAT:
        ipt(node, "-t", "nat", *args)
    admin_filter, admin_nat = rules(node, "filter"), rules(node, "nat")
    assert masq(node, "ensure", mode="iptables").returncode == 0
    assert rules(node, "filter") == admin_filter + FILTER_RULES
    assert rules(node, "nat") == admin_nat + NAT_RULES
    assert masq(node, "check", mode="iptables").returncode == 0  # not first, and no drift
    for _ in range(3):
        assert masq(node, "resync", mode="iptables").returncode == 0
        assert masq(node, "ensure", mode="iptables").returncode == 0
    assert rules(node, "filter") == admin_filter + FILTER_RULES
    assert rules(node, "nat") == admin_nat + NAT_RULES


def test_iptables_resync_leaves_a_jump_where_the_admin_put_rules_above_it(node):
    need("iptables")
    masq(node, "ensure", mode="iptables")
    ipt(node, "-I", "FORWARD", "1", "-j", "DROP")  # an admin's rule, after flannel started
    ipt(node, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
    assert masq(node, "check", mode="iptables").returncode == 0
    for _ in range(3):
        assert masq(node, "resync", mode="iptables").returncode == 0
    assert rules(node, "filter") == ["-A FORWARD -j DROP", *FILTER_RULES]
    assert rules(node, "nat") == ["-A POSTROUTING -o eth0 -j MASQUERADE", *NAT_RULES]


def test_iptables_resync_appends_a_deleted_jump_and_keeps_one_of_duplicates(node):
    need("iptables")
    masq(node, "ensure", mode="iptables")
    ipt(node, "-I", "FORWARD", "1", "-j", "DROP")
    ipt(node, "-D", "FORWARD", *shlex.split(FILTER_RULES[0])[2:])  # the forward jump gone
    ipt(node, "-t", "nat", "-I", "POSTROUTING", "1", "-o", "eth0", "-j", "MASQUERADE")
    ipt(node, "-t", "nat", "-A", "POSTROUTING", *shlex.split(NAT_RULES[0])[2:])  # a second jump
    assert masq(node, "check", mode="iptables").returncode == 1
    assert masq(node, "resync", mode="iptables").returncode == 0
    assert rules(node, "filter") == ["-A FORWARD -j DROP", *FILTER_RULES]
    assert rules(node, "nat") == ["-A POSTROUTING -o eth0 -j MASQUERADE", *NAT_RULES]
    assert masq(node, "check", mode="iptables").returncode == 0


@pytest.mark.parametrize("foreign", [False, True], ids=["pristine", "with-foreign-rules"])
def test_iptables_cleanup_leaves_the_tables_as_before(node, foreign):
    need("iptables")
    lab, ns = node
    if foreign:
        lab.run(ns, "iptables-restore", "--noflush", input=FOREIGN)
        if shutil.which("nft"):
            lab.run(ns, "nft", "-f", "-", input=FOREIGN_NFT)
    before = snapshot(node)
    assert masq(node, "ensure", mode="iptables").returncode == 0
    assert snapshot(node) != before
    assert masq(node, "cleanup").returncode == 0
    assert snapshot(node) == before
    assert masq(node, "cleanup").returncode == 0  # twice is fine
    assert snapshot(node) == before


# -- nftables -----------------------------------------------------------------------------------


def test_nftables_exact_rule_set_and_idempotent(node):
    need("nft")
    assert masq(node, "ensure", mode="nftables").returncode == 0
    assert nft_table(node) == NFT_TABLE
    assert masq(node, "ensure", mode="nftables").returncode == 0
    assert nft_table(node) == NFT_TABLE
    res = masq(node, "check", mode="nftables")
    assert res.returncode == 0 and res.stdout.strip() == "in sync"


def test_nftables_resync_restores_deleted_rules_and_order(node):
    need("nft")
    lab, ns = node
    masq(node, "ensure", mode="nftables")
    listing = lab.run(ns, "nft", "-a", "list", "chain", "ip", "flannel-ipv4", "postrtg").stdout
    handles = re.findall(r'masq" # handle (\d+)', listing)  # its rules, in order
    lab.run(ns, "nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handles[2])
    lab.run(ns, "nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handles[0])
    add = "add rule ip flannel-ipv4"
    lab.run(ns, "nft", f'{add} postrtg meta mark & 0x4000 == 0x4000 return comment "flanneld masq"')
    lab.run(ns, "nft", f"{add} forward ip saddr 10.0.0.1 drop")  # a stranger's rule
    assert masq(node, "check", mode="nftables").returncode == 1
    res = masq(node, "resync", mode="nftables")
    assert res.returncode == 0 and res.stderr.count("masquerade rules repaired") == 1
    assert nft_table(node) == NFT_TABLE
    again = masq(node, "resync", mode="nftables")
    assert again.returncode == 0 and "repaired" not in again.stderr
    lab.run(ns, "nft", "delete", "table", "ip", "flannel-ipv4")
    assert masq(node, "resync", mode="nftables").returncode == 0
    assert nft_table(node) == NFT_TABLE


@pytest.mark.parametrize("foreign", [False, True], ids=["pristine", "with-foreign-rules"])
def test_nftables_cleanup_leaves_the_tables_as_before(node, foreign):
    need("nft")
    lab, ns = node
    if foreign:
        lab.run(ns, "nft", "-f", "-", input=FOREIGN_NFT)
    before = snapshot(node) if shutil.which("iptables") else ""
    before_nft = lab.run(ns, "nft", "list", "ruleset").stdout
    assert masq(node, "ensure", mode="nftables").returncode == 0
    assert masq(node, "cleanup").returncode == 0
    assert lab.run(ns, "nft", "list", "ruleset").stdout == before_nft
    assert masq(node, "cleanup").returncode == 0
    assert lab.run(ns, "nft", "list", "ruleset").stdout == before_nft
    if before:
        assert snapshot(node) == before


# -- switching modes ----------------------------------------------------------------------------


def test_switching_mode_removes_the_other_modes_rules(node):
    need("iptables", "nft")
    masq(node, "ensure", mode="iptables")
    assert masq(node, "ensure", mode="nftables").returncode == 0
    assert rules(node, "nat") == [] and rules(node, "filter") == []
    assert nft_table(node) == NFT_TABLE
    assert masq(node, "ensure", mode="iptables").returncode == 0
    lab, ns = node
    assert "flannel-ipv4" not in lab.run(ns, "nft", "list", "tables").stdout
    assert rules(node, "nat") == NAT_RULES


# -- IPv6 (dual-stack) --------------------------------------------------------------------------

NET6, SUBNET6 = "fd00:10:244::/48", "fd00:10:244:3::/64"
NAT6_RULES = [
    f"-A POSTROUTING {COMMENT} -j FLANNEL-POSTRTG",
    f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s fd00:10:244:3::/64 -d fd00:10:244::/48 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s fd00:10:244::/48 -d fd00:10:244:3::/64 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244:3::/64 {COMMENT} -j RETURN",
    f"-A FLANNEL-POSTRTG -s fd00:10:244::/48 ! -d ff00::/8 {COMMENT} {MASQ}",
    f"-A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244::/48 {COMMENT} {MASQ}",
]
FILTER6_RULES = [
    f"-A FORWARD {FWD_COMMENT} -j FLANNEL-FWD",
    f"-A FLANNEL-FWD -s fd00:10:244::/48 {FWD_COMMENT} -j ACCEPT",
    f"-A FLANNEL-FWD -d fd00:10:244::/48 {FWD_COMMENT} -j ACCEPT",
]
NFT6_TABLE = f"""table ip6 flannel-ipv6 {{
	chain postrtg {{
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return {M}
		ip6 saddr fd00:10:244:3::/64 ip6 daddr fd00:10:244::/48 return {M}
		ip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244:3::/64 return {M}
		ip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244:3::/64 return {M}
		ip6 saddr fd00:10:244::/48 ip6 daddr != ff00::/8 masquerade fully-random {M}
		ip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244::/48 masquerade fully-random {M}
	}}

	chain forward {{
		type filter hook forward priority filter; policy accept;
		ip6 saddr fd00:10:244::/48 accept {F}
		ip6 daddr fd00:10:244::/48 accept {F}
	}}
}}"""


def rules6(node, table: str) -> list[str]:
    lab, ns = node
    out = lab.run(ns, "ip6tables-save", "-t", table).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


def nft_table6(node) -> str:
    lab, ns = node
    return lab.run(ns, "nft", "list", "table", "ip6", "flannel-ipv6").stdout.strip()


def test_ipv4_only_rules_leave_ip6tables_alone(node):
    need("iptables", "ip6tables")
    assert masq(node, "ensure", mode="iptables").returncode == 0
    assert rules(node, "nat") == NAT_RULES
    assert rules6(node, "nat") == [] and rules6(node, "filter") == []


def test_ipv6_iptables_rules_installed_restored_and_cleaned_with_the_ipv4_ones(node):
    need("iptables", "ip6tables")
    lab, ns = node
    before = snapshot(node)
    assert masq(node, "ensure", mode="iptables", dual=True).returncode == 0
    assert rules(node, "nat") == NAT_RULES and rules(node, "filter") == FILTER_RULES
    assert rules6(node, "nat") == NAT6_RULES and rules6(node, "filter") == FILTER6_RULES
    first = snapshot(node)
    assert masq(node, "ensure", mode="iptables", dual=True).returncode == 0
    assert snapshot(node) == first  # no duplicates, same order
    res = masq(node, "check", mode="iptables", dual=True)
    assert res.returncode == 0 and res.stdout.strip() == "in sync"

    lab.run(ns, "ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3")  # a deleted IPv6 rule
    lab.run(ns, "ip6tables", "-I", "FORWARD", "1", "-j", "DROP")  # an admin's rule
    lab.run(ns, "ip6tables", "-D", "FORWARD", *shlex.split(FILTER6_RULES[0])[2:])  # jump gone
    res = masq(node, "check", mode="iptables", dual=True)
    assert res.returncode == 1
    assert res.stdout.splitlines() == [
        "IPv6: FLANNEL-POSTRTG: 1 rule(s) missing",
        "IPv6: FORWARD: 0 jumps to FLANNEL-FWD, want 1",
    ]
    res = masq(node, "resync", mode="iptables", dual=True)
    assert res.returncode == 0 and res.stderr.count("masquerade rules repaired (IPv6: ") == 1
    assert rules6(node, "nat") == NAT6_RULES
    assert rules6(node, "filter") == ["-A FORWARD -j DROP", *FILTER6_RULES]  # appended below
    assert rules(node, "nat") == NAT_RULES and rules(node, "filter") == FILTER_RULES
    again = masq(node, "resync", mode="iptables", dual=True)
    assert again.returncode == 0 and "repaired" not in again.stderr
    lab.run(ns, "ip6tables", "-D", "FORWARD", "-j", "DROP")

    assert masq(node, "cleanup").returncode == 0  # IPv4 and IPv6 alike
    assert rules6(node, "nat") == [] and rules6(node, "filter") == []
    assert rules(node, "nat") == [] and rules(node, "filter") == []
    assert snapshot(node) == before
    assert masq(node, "cleanup").returncode == 0
    assert snapshot(node) == before


def test_ipv6_nftables_table_installed_restored_and_cleaned_with_the_ipv4_one(node):
    need("nft")
    lab, ns = node
    before = lab.run(ns, "nft", "list", "ruleset").stdout
    assert masq(node, "ensure", mode="nftables", dual=True).returncode == 0
    assert nft_table(node) == NFT_TABLE
    assert nft_table6(node) == NFT6_TABLE
    res = masq(node, "check", mode="nftables", dual=True)
    assert res.returncode == 0 and res.stdout.strip() == "in sync"

    listing = lab.run(ns, "nft", "-a", "list", "chain", "ip6", "flannel-ipv6", "postrtg").stdout
    handles = re.findall(r'masq" # handle (\d+)', listing)
    lab.run(ns, "nft", "delete", "rule", "ip6", "flannel-ipv6", "postrtg", "handle", handles[3])
    res = masq(node, "check", mode="nftables", dual=True)
    assert res.returncode == 1 and res.stdout.strip() == "IPv6: postrtg: 1 rule(s) missing"
    res = masq(node, "resync", mode="nftables", dual=True)
    assert res.returncode == 0 and res.stderr.count("masquerade rules repaired (IPv6: ") == 1
    assert nft_table6(node) == NFT6_TABLE and nft_table(node) == NFT_TABLE
    lab.run(ns, "nft", "delete", "table", "ip6", "flannel-ipv6")
    assert masq(node, "resync", mode="nftables", dual=True).returncode == 0
    assert nft_table6(node) == NFT6_TABLE

    assert masq(node, "cleanup").returncode == 0  # IPv4 and IPv6 alike
    assert lab.run(ns, "nft", "list", "ruleset").stdout == before
    assert masq(node, "cleanup").returncode == 0
    assert lab.run(ns, "nft", "list", "ruleset").stdout == before


def test_ipv6_switching_mode_removes_the_other_modes_rules(node):
    need("iptables", "ip6tables", "nft")
    lab, ns = node
    assert masq(node, "ensure", mode="iptables", dual=True).returncode == 0
    assert masq(node, "ensure", mode="nftables", dual=True).returncode == 0
    assert rules6(node, "nat") == [] and rules6(node, "filter") == []
    assert nft_table6(node) == NFT6_TABLE
    assert masq(node, "ensure", mode="iptables", dual=True).returncode == 0
    assert "flannel-ipv6" not in lab.run(ns, "nft", "list", "tables").stdout
    assert rules6(node, "nat") == NAT6_RULES
