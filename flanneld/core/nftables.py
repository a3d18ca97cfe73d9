"""A firewall rule set in nftables terms: the `nft -f` script that installs it as table
`ip flannel-ipv4` (its IPv6 chains, `family` 6, as table `ip6 flannel-ipv6`), and its drift
from `nft -j list` output. Pure: text and JSON in, text out.
"""

# The whole table is replaced atomically: the script adds it (harmless if it exists), deletes
# it and writes it again, all in one transaction.
#
# Two rules differ from the reference's nftables ones, which do not mean what its iptables ones
# mean: the mark test is masked (`meta mark & 0x4000 == 0x4000`, like `--mark 0x4000/0x4000`;
# the reference's exact `meta mark 0x4000` misses packets carrying other mark bits too), and
# rule 4 is `ip saddr != C ip daddr P return` (the reference has `ip saddr != P ip daddr C`,
# which returns for everything from outside P into C: every packet the last rule, `ip saddr
# != C ip daddr C masquerade` for the host to pods, would match, so that rule never matches).
# The IPv6 table gets the same two fixes (`ip6 saddr != C ip6 daddr P return`).

from __future__ import annotations

import json
from typing import Any

from flanneld.core.firewall import KUBE_PROXY_MARK, Net, Rule, RuleSet, labelled, rule_diff

NFT_TABLE = "flannel-ipv4"
NFT_TABLE6 = "flannel-ipv6"
NFT_FAMILY = {4: "ip", 6: "ip6"}  # the nft family of a table, and the protocol of its matches
NFT_TABLES = {4: NFT_TABLE, 6: NFT_TABLE6}


def drop_table(family: int = 4) -> str:
    """An `nft -f` script deleting our table of `family`; no error if it is absent."""
    fam, name = NFT_FAMILY[family], NFT_TABLES[family]
    return f"add table {fam} {name}\ndelete table {fam} {name}\n"


def fully_random_probe(family: int = 4) -> str:
    """For `nft --check`: a masquerade fully-random rule, checked, never applied."""
    return (
        f"table {NFT_FAMILY[family]} flannel-probe {{ chain probe {{ type nat hook postrouting "
        "priority srcnat; masquerade fully-random; }; }\n"
    )


DROP_TABLE = drop_table(4)
FULLY_RANDOM_PROBE = fully_random_probe(4)
_PRIORITY = {"srcnat": 100, "filter": 0}


def nft_rule(rule: Rule, comment: str, family: int = 4) -> str:
    parts: list[str] = []
    if rule.kube_mark:
        parts.append(f"meta mark & {KUBE_PROXY_MARK:#x} == {KUBE_PROXY_MARK:#x}")
    for field, net, neg in (("saddr", rule.src, rule.src_neg), ("daddr", rule.dst, rule.dst_neg)):
        if net is not None:
            parts.append(f"{NFT_FAMILY[family]} {field} {'!= ' if neg else ''}{net}")
    parts.append(rule.action.lower() + (" fully-random" if rule.random_fully else ""))
    parts.append(f'comment "{comment}"')
    return " ".join(parts)


def nft_script(ruleset: RuleSet, family: int = 4) -> str:
    """An `nft -f` script that replaces table `ip flannel-ipv4` (`ip6 flannel-ipv6` for
    `family` 6) with the `family` chains of `ruleset` atomically (the add makes the delete safe
    when the table does not exist yet)."""
    lines = [f"table {NFT_FAMILY[family]} {NFT_TABLES[family]} {{"]
    for c in ruleset.family(family).chains:
        lines += [
            f"\tchain {c.nft_name} {{",
            f"\t\ttype {c.nft_type} hook {c.nft_hook} priority {c.nft_priority}; policy accept;",
            *(f"\t\t{nft_rule(r, c.comment, family)}" for r in c.rules),
            "\t}",
        ]
    lines.append("}")
    return drop_table(family) + "".join(f"{line}\n" for line in lines)


def _nft_addr(net: Net) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def nft_expr(rule: Rule, family: int = 4) -> list[Any]:
    """The rule as `nft -j list` reports its expressions."""
    expr: list[Any] = []
    if rule.kube_mark:
        mark = {"&": [{"meta": {"key": "mark"}}, KUBE_PROXY_MARK]}
        expr.append({"match": {"op": "==", "left": mark, "right": KUBE_PROXY_MARK}})
    for field, net, neg in (("saddr", rule.src, rule.src_neg), ("daddr", rule.dst, rule.dst_neg)):
        if net is not None:
            left = {"payload": {"protocol": NFT_FAMILY[family], "field": field}}
            op = "!=" if neg else "=="
            expr.append({"match": {"op": op, "left": left, "right": _nft_addr(net)}})
    verdict = rule.action.lower()
    flags = {"flags": ["fully-random"]} if rule.random_fully else None
    expr.append({verdict: flags})
    return expr


def _canonical(expr: Any) -> str:
    """A comparable form of an expression list (nft prints a single flag as a bare string)."""

    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {
                k: [v] if k == "flags" and isinstance(v, str) else norm(v) for k, v in x.items()
            }
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x

    return json.dumps(norm(expr), sort_keys=True)


def nft_drift(ruleset: RuleSet, listing: list[dict[str, Any]] | None, family: int = 4) -> list[str]:
    """How the objects of `nft -j list table ip flannel-ipv4` (`ip6 flannel-ipv6` for `family`
    6; None: no such table) differ from the `family` chains of `ruleset`, one phrase per
    difference (IPv6 ones say so); [] when exact."""
    if listing is None:
        return labelled(family, [f"table {NFT_FAMILY[family]} {NFT_TABLES[family]} missing"])
    have = {o["chain"]["name"]: o["chain"] for o in listing if "chain" in o}
    want = {c.nft_name: c for c in ruleset.family(family).chains}
    out = [f"unexpected chain {name}" for name in have if name not in want]
    for name, c in want.items():
        got = have.get(name)
        if got is None:
            out.append(f"chain {name} missing")
            continue
        base = (got.get("type"), got.get("hook"), got.get("prio"), got.get("policy"))
        if base != (c.nft_type, c.nft_hook, _PRIORITY[c.nft_priority], "accept"):
            out.append(f"chain {name}: wrong type, hook, priority or policy")
        rules_have = [
            (o["rule"].get("comment"), _canonical(o["rule"].get("expr")))
            for o in listing
            if "rule" in o and o["rule"].get("chain") == name
        ]
        rules_want = [(c.comment, _canonical(nft_expr(r, family))) for r in c.rules]
        out += rule_diff(name, rules_have, rules_want)
    return labelled(family, out)


def drop_if_empty(table: str, listing: list[dict[str, Any]] | None, family: int = 4) -> str:
    """An `nft -f` script deleting `ip <table>` (`ip6 <table>` for `family` 6; as `nft -j
    list` lists it) if it holds nothing but empty ACCEPT base chains, else "".

    iptables-nft creates a table on first use and never deletes it; after our chains are gone
    an empty one is what is left of ours. Deleting its chains one by one in the transaction
    makes it fail, leaving everything, should someone add a rule meanwhile."""
    if listing is None or {k for o in listing for k in o} - {"metainfo", "table", "chain"}:
        return ""
    chains = [o["chain"] for o in listing if "chain" in o]
    if any(c.get("hook") is None or c.get("policy") != "accept" for c in chains):
        return ""
    fam = NFT_FAMILY[family]
    script = [f"delete chain {fam} {table} {c['name']}" for c in chains]
    script.append(f"delete table {fam} {table}")
    return "".join(f"{line}\n" for line in script)
