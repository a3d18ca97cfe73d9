"""A firewall rule set in nftables terms: the `nft -f` script that installs it as table
`ip flannel-ipv4`, and its drift from `nft -j list` output. Pure: text and JSON in, text out.
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

from __future__ import annotations

import json
from ipaddress import IPv4Network
from typing import Any

from flanneld.core.firewall import KUBE_PROXY_MARK, Rule, RuleSet, rule_diff

NFT_TABLE = "flannel-ipv4"
DROP_TABLE = f"add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"  # no error if absent
FULLY_RANDOM_PROBE = (  # for `nft --check`: checked, never applied
    "table ip flannel-probe { chain probe { type nat hook postrouting priority srcnat; "
    "masquerade fully-random; }; }\n"
)
_PRIORITY = {"srcnat": 100, "filter": 0}


def nft_rule(rule: Rule, comment: str) -> str:
    parts: list[str] = []
    if rule.kube_mark:
        parts.append(f"meta mark & {KUBE_PROXY_MARK:#x} == {KUBE_PROXY_MARK:#x}")
    for field, net, neg in (("saddr", rule.src, rule.src_neg), ("daddr", rule.dst, rule.dst_neg)):
        if net is not None:
            parts.append(f"ip {field} {'!= ' if neg else ''}{net}")
    parts.append(rule.action.lower() + (" fully-random" if rule.random_fully else ""))
    parts.append(f'comment "{comment}"')
    return " ".join(parts)


def nft_script(ruleset: RuleSet) -> str:
    """An `nft -f` script that replaces table `ip flannel-ipv4` with `ruleset` atomically
    (the add makes the delete safe when the table does not exist yet)."""
    lines = [f"table ip {NFT_TABLE} {{"]
    for c in ruleset.chains:
        lines += [
            f"\tchain {c.nft_name} {{",
            f"\t\ttype {c.nft_type} hook {c.nft_hook} priority {c.nft_priority}; policy accept;",
            *(f"\t\t{nft_rule(r, c.comment)}" for r in c.rules),
            "\t}",
        ]
    lines.append("}")
    return DROP_TABLE + "".join(f"{line}\n" for line in lines)


def _nft_addr(net: IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def nft_expr(rule: Rule) -> list[Any]:
    """The rule as `nft -j list` reports its expressions."""
    expr: list[Any] = []
    if rule.kube_mark:
        mark = {"&": [{"meta": {"key": "mark"}}, KUBE_PROXY_MARK]}
        expr.append({"match": {"op": "==", "left": mark, "right": KUBE_PROXY_MARK}})
    for field, net, neg in (("saddr", rule.src, rule.src_neg), ("daddr", rule.dst, rule.dst_neg)):
        if net is not None:
            left = {"payload": {"protocol": "ip", "field": field}}
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


def nft_drift(ruleset: RuleSet, listing: list[dict[str, Any]] | None) -> list[str]:
    """How the objects of `nft -j list table ip flannel-ipv4` (None: no such table) differ
    from `ruleset`, one phrase per difference; [] when exact."""
    if listing is None:
        return [f"table ip {NFT_TABLE} missing"]
    have = {o["chain"]["name"]: o["chain"] for o in listing if "chain" in o}
    want = {c.nft_name: c for c in ruleset.chains}
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
        rules_want = [(c.comment, _canonical(nft_expr(r))) for r in c.rules]
        out += rule_diff(name, rules_have, rules_want)
    return out


def drop_if_empty(table: str, listing: list[dict[str, Any]] | None) -> str:
    """An `nft -f` script deleting `ip <table>` (as `nft -j list` lists it) if it holds nothing
    but empty ACCEPT base chains, else "".

    iptables-nft creates a table on first use and never deletes it; after our chains are gone
    an empty one is what is left of ours. Deleting its chains one by one in the transaction
    makes it fail, leaving everything, should someone add a rule meanwhile."""
    if listing is None or {k for o in listing for k in o} - {"metainfo", "table", "chain"}:
        return ""
    chains = [o["chain"] for o in listing if "chain" in o]
    if any(c.get("hook") is None or c.get("policy") != "accept" for c in chains):
        return ""
    script = [f"delete chain ip {table} {c['name']}" for c in chains] + [f"delete table ip {table}"]
    return "".join(f"{line}\n" for line in script)
