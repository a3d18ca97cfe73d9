"""A firewall rule set in iptables terms: the `iptables-restore --noflush` input that installs
it, and its drift from `iptables-save` output; for IPv6 (`family` 6) the same in ip6tables
terms (`ip6tables-restore`, `ip6tables-save`). Pure: text in, text out.
"""

# Installing means flushing and refilling our chain in one transaction: rules of a previous
# network or subnet (subnet.env) vanish with it, and order and duplicates come out right by
# construction. The one rule outside, the jump from POSTROUTING (FORWARD), is appended as the
# reference does and must exist exactly once, wherever it is: rules above it (an admin's DROP,
# Docker's DOCKER-USER jump) stay above it, and an existing jump is never moved. A missing jump
# is appended; of duplicates the last one is kept; any other rule that jumps to our chain or
# carries our comment (an old flannel's rule in POSTROUTING) is deleted in the same transaction.
# ip6tables has the same tables, chains and syntax: only the addresses differ, so both families
# are rendered by the same code, each from its own chains of the rule set.

from __future__ import annotations

import re
from collections.abc import Mapping

from flanneld.core.firewall import (
    CHAINS,
    KUBE_PROXY_MARK,
    Chain,
    Rule,
    RuleSet,
    labelled,
    rule_diff,
)

WAIT_AND_RANDOM_FULLY = (1, 6, 2)  # first iptables with `--random-fully` and restore `--wait`


def parse_version(out: str) -> tuple[tuple[int, ...], bool] | None:
    """(version, whether it is the nf_tables variant) from `iptables --version` output such as
    "iptables v1.8.9 (nf_tables)"; None when it names no version."""
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        return None
    return tuple(int(x) for x in m.groups()), "nf_tables" in out


def iptables_rule(rule: Rule, comment: str) -> str:
    """The rule spec as `iptables-save` prints it, so that saved lines compare as strings."""
    parts: list[str] = []
    for flag, net, neg in (("-s", rule.src, rule.src_neg), ("-d", rule.dst, rule.dst_neg)):
        if net is not None:
            parts += [*(["!"] if neg else []), flag, str(net)]
    if rule.kube_mark:
        parts += ["-m", "mark", "--mark", f"{KUBE_PROXY_MARK:#x}/{KUBE_PROXY_MARK:#x}"]
    parts += ["-m", "comment", "--comment", f'"{comment}"', "-j", rule.action]
    if rule.random_fully:
        parts.append("--random-fully")
    return " ".join(parts)


def _jump(chain: Chain) -> str:
    return f'-m comment --comment "{chain.comment}" -j {chain.name}'


def parse_save(text: str) -> dict[str, list[str]]:
    """One table of `iptables-save` output: chain name → its rule specs, in order."""
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            name, _, spec = line[3:].partition(" ")
            chains.setdefault(name, []).append(spec)
    return chains


def _refs(chain: Chain, saved: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Rules outside `chain` that jump to it or carry its comment: its jump rules, ours."""
    target = re.compile(rf"(^|\s)-[jg] {re.escape(chain.name)}(\s|$)")
    comment = f'--comment "{chain.comment}"'
    return [
        (name, spec)
        for name, specs in saved.items()
        if name != chain.name
        for spec in specs
        if comment in spec or target.search(spec)
    ]


def _jumps(chain: Chain, saved: dict[str, list[str]]) -> tuple[int, list[tuple[str, str]]]:
    """How many copies of our jump the hook chain holds (anywhere in it), and the other rules
    outside `chain` that refer to it."""
    jump = (chain.hook, _jump(chain))
    refs = _refs(chain, saved)
    return refs.count(jump), [ref for ref in refs if ref != jump]


def _section(template: Chain, want: Chain | None, saved: dict[str, list[str]]) -> str:
    refs = _refs(template, saved)
    lines: list[str] = []
    if want is not None:
        lines.append(f":{want.name} - [0:0]")  # with --noflush: creates or flushes it
        copies, others = _jumps(want, saved)
        lines += [f"-D {name} {spec}" for name, spec in others]
        # `-D` by spec deletes the first copy: the last one stays where it is
        lines += [f"-D {want.hook} {_jump(want)}"] * max(copies - 1, 0)
        if copies == 0:
            lines.append(f"-A {want.hook} {_jump(want)}")
        lines += [f"-A {want.name} {iptables_rule(r, want.comment)}" for r in want.rules]
    else:
        lines += [f"-D {name} {spec}" for name, spec in refs]
        if template.name in saved:
            lines += [f"-F {template.name}", f"-X {template.name}"]
    if not lines:
        return ""
    return "".join(f"{line}\n" for line in [f"*{template.table}", *lines, "COMMIT"])


def iptables_payload(
    ruleset: RuleSet, saved: Mapping[str, str] | None = None, family: int = 4
) -> str:
    """The `iptables-restore --noflush` input (`ip6tables-restore` for `family` 6) that turns
    the tables in `saved` (table name → `iptables-save -t` output; none for a node without our
    rules) into the `family` chains of `ruleset`; our chains not in it are removed. Empty when
    there is nothing to do."""
    saved = saved or {}
    return "".join(
        _section(t, ruleset.chain(t.name, family), parse_save(saved.get(t.table, "")))
        for t in CHAINS
    )


def payload_tables(payload: str) -> list[str]:
    """The tables an `iptables-restore` input writes to, in order."""
    return re.findall(r"^\*(\w+)$", payload, re.M)


def iptables_drift(ruleset: RuleSet, saved: Mapping[str, str], family: int = 4) -> list[str]:
    """How the saved tables (of `ip6tables-save` for `family` 6) differ from the `family`
    chains of `ruleset`, one phrase per difference (IPv6 ones say so); [] when exact."""
    out: list[str] = []
    for template in CHAINS:
        want = ruleset.chain(template.name, family)
        tables = parse_save(saved.get(template.table, ""))
        if want is None:
            if template.name in tables or _refs(template, tables):
                out.append(f"{template.name} should not exist")
            continue
        if want.name not in tables:
            out.append(f"{want.name} missing")
            continue
        specs = [iptables_rule(r, want.comment) for r in want.rules]
        out += rule_diff(want.name, tables[want.name], specs)
        copies, others = _jumps(want, tables)
        if copies != 1:
            out.append(f"{want.hook}: {copies} jumps to {want.name}, want 1")
        if others:
            out.append(f"{len(others)} other rule(s) refer to {want.name}")
    return labelled(family, out)
