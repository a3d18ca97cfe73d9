"""Flannel's masquerade and forward rules as data: `rules()` gives the rule set of a node.

The renderings and the drift checks are in `iptables` and `nftables` beside this module; the
commands that apply them are in `flanneld.edges.masq`.
"""

# Every rule lives in a chain of our own (FLANNEL-POSTRTG in nat, FLANNEL-FWD in filter, or the
# chains `postrtg` and `forward` of the nftables table `ip flannel-ipv4`), reached by one jump
# from a built-in chain (POSTROUTING, FORWARD); a `Chain` carries both spellings of its names.
# A `RuleSet` holds the chains that should exist: a chain not in it should not exist at all.
#
# A dual-stack node has the same chains once more for IPv6 (`family` 6: the same names in
# ip6tables, or table `ip6 flannel-ipv6`), built from the IPv6 network and lease subnet, with
# ff00::/8 as the multicast range. Each family is rendered, checked and repaired on its own: the
# renderers take a `family` and look only at that family's chains.

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

KUBE_PROXY_MARK = 0x4000  # kube-proxy marks what it masquerades itself: no double NAT
MULTICAST = IPv4Network("224.0.0.0/4")
MULTICAST6 = IPv6Network("ff00::/8")
FAMILIES = (4, 6)

Net = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Rule:
    action: str  # iptables target: RETURN, MASQUERADE or ACCEPT
    src: Net | None = None
    dst: Net | None = None
    src_neg: bool = False
    dst_neg: bool = False
    kube_mark: bool = False
    random_fully: bool = False


@dataclass(frozen=True)
class Chain:
    table: str  # iptables table
    name: str  # iptables chain
    hook: str  # the built-in iptables chain that jumps to it
    comment: str  # on every rule, the jump included
    nft_name: str
    nft_type: str
    nft_hook: str
    nft_priority: str
    rules: tuple[Rule, ...] = ()
    family: int = 4  # 4: iptables, table ip flannel-ipv4; 6: ip6tables, table ip6 flannel-ipv6


MASQ_CHAIN = Chain(
    table="nat",
    name="FLANNEL-POSTRTG",
    hook="POSTROUTING",
    comment="flanneld masq",
    nft_name="postrtg",
    nft_type="nat",
    nft_hook="postrouting",
    nft_priority="srcnat",
)
FWD_CHAIN = Chain(
    table="filter",
    name="FLANNEL-FWD",
    hook="FORWARD",
    comment="flanneld forward",
    nft_name="forward",
    nft_type="filter",
    nft_hook="forward",
    nft_priority="filter",
)
CHAINS = (MASQ_CHAIN, FWD_CHAIN)  # every chain the agent may own in one family, empty


@dataclass(frozen=True)
class RuleSet:
    chains: tuple[Chain, ...]

    def chain(self, name: str, family: int = 4) -> Chain | None:
        return next((c for c in self.chains if c.name == name and c.family == family), None)

    def family(self, family: int) -> RuleSet:
        """The chains of one address family alone."""
        return RuleSet(tuple(c for c in self.chains if c.family == family))


NOTHING = RuleSet(())  # what cleanup installs


def _family_chains(
    family: int,
    c: Net,
    p: Net,
    multicast: Net,
    random_fully: bool,
    forward: bool,
    masq: bool,
) -> list[Chain]:
    masq_rules = (
        Rule("RETURN", kube_mark=True),
        Rule("RETURN", src=p, dst=c),  # pod to pod: no NAT
        Rule("RETURN", src=c, dst=p),
        Rule("RETURN", src=c, src_neg=True, dst=p),  # outside to a local pod (e.g. a NodePort)
        Rule("MASQUERADE", src=c, dst=multicast, dst_neg=True, random_fully=random_fully),
        Rule("MASQUERADE", src=c, src_neg=True, dst=c, random_fully=random_fully),  # host to pods
    )
    chains = [replace(MASQ_CHAIN, rules=masq_rules, family=family)] if masq else []
    if forward:
        accept = (Rule("ACCEPT", src=c), Rule("ACCEPT", dst=c))
        chains.append(replace(FWD_CHAIN, rules=accept, family=family))
    return chains


def rules(
    network: IPv4Network | None,
    subnet: IPv4Network,
    random_fully: bool,
    forward: bool,
    masq: bool = True,
    *,
    network6: IPv6Network | None = None,
    subnet6: IPv6Network | None = None,
    random_fully6: bool | None = None,
) -> RuleSet:
    """flannel's rules for cluster network C = `network` and this node's lease P = `subnet`:
    the masquerade chain unless `masq` is off, the forward chain if `forward` is on; with
    `network6` and `subnet6` (both or neither) the same chains for IPv6, fully random when
    `random_fully6` is (None: as `random_fully`). `network` None: an IPv6-only network, no
    IPv4 chains."""
    if (network6 is None) != (subnet6 is None):
        raise ValueError("the IPv6 rules need both network6 and subnet6")
    chains = []
    if network is not None:
        chains += _family_chains(4, network, subnet, MULTICAST, random_fully, forward, masq)
    if network6 is not None and subnet6 is not None:
        rf6 = random_fully if random_fully6 is None else random_fully6
        chains += _family_chains(6, network6, subnet6, MULTICAST6, rf6, forward, masq)
    return RuleSet(tuple(chains))


def rule_diff(label: str, have: Sequence[Hashable], want: Sequence[Hashable]) -> list[str]:
    """One phrase on how a chain's rules `have` differ from `want` (in order); [] when equal."""
    if list(have) == list(want):
        return []
    missing = sum((Counter(want) - Counter(have)).values())
    extra = sum((Counter(have) - Counter(want)).values())
    parts = []
    if missing:
        parts.append(f"{missing} rule(s) missing")
    if extra:
        parts.append(f"{extra} unexpected")
    return [f"{label}: {', '.join(parts) or 'out of order'}"]


def labelled(family: int, phrases: list[str]) -> list[str]:
    """Drift phrases of one family as reported: IPv6 ones say so, IPv4 ones are unmarked."""
    return [f"IPv6: {p}" for p in phrases] if family == 6 else phrases
