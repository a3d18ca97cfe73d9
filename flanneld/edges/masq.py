"""Masquerade and forward rules (`--ip-masq`, `--iptables-forward-rules`), iptables or nftables.

Owns the nat chain FLANNEL-POSTRTG, the filter chain FLANNEL-FWD and their jump rules, or the
nftables table `ip flannel-ipv4`: installs them, repairs drift, and removes them on cleanup.
"""

# Theory of operation.
#
# The pure part, `rules()`, gives flannel's rule set (section 6 of the reference notes) as a
# `RuleSet`; `iptables_payload()` and `nft_script()` render it, and `iptables_drift()` and
# `nft_drift()` compare it with what the kernel reports (`iptables-save`, `nft -j list`).
#
# Every rule lives in a chain (or table) of our own, so installing means flushing and refilling
# it in one transaction: rules of a previous network or subnet (subnet.env) vanish with it, and
# order and duplicates come out right by construction. The one rule outside, the jump from
# POSTROUTING (FORWARD), is appended as the reference does and must exist exactly once, wherever
# it is: rules above it (an admin's DROP, Docker's DOCKER-USER jump) stay above it, and an
# existing jump is never moved. A missing jump is appended; of duplicates the last one is kept;
# any other rule that jumps to our chain or carries our comment (an old flannel's rule in
# POSTROUTING) is deleted in the same transaction. In nftables mode the whole table is replaced
# atomically.
#
# `Masquerade` runs the commands: `ensure()` installs, `check()` compares, `resync()` repairs
# when they differ, `cleanup()` removes everything of both modes. Errors end in one log line
# naming the command and its stderr; nothing raises out of `resync()`.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import shutil
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Network
from typing import Any

log = logging.getLogger("flanneld.edges.masq")  # also when run as `python -m flanneld.edges.masq`

IPTABLES, NFTABLES = "iptables", "nftables"
NFT_TABLE = "flannel-ipv4"
KUBE_PROXY_MARK = 0x4000  # kube-proxy marks what it masquerades itself: no double NAT
MULTICAST = IPv4Network("224.0.0.0/4")
CMD_TIMEOUT = 10.0
WAIT_AND_RANDOM_FULLY = (1, 6, 2)  # first iptables with `--random-fully` and restore `--wait`
_NFT_PRIORITY = {"srcnat": 100, "filter": 0}
_NFT_DROP = f"add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"  # no error if absent
_NFT_PROBE = (  # checked, never applied
    "table ip flannel-probe { chain probe { type nat hook postrouting priority srcnat; "
    "masquerade fully-random; }; }\n"
)
_PACKAGE = {"iptables": "iptables", "iptables-save": "iptables", "iptables-restore": "iptables"}


class MasqError(RuntimeError):
    """A command failed; the message names it and its stderr."""


# -- the rule set (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    action: str  # iptables target: RETURN, MASQUERADE or ACCEPT
    src: IPv4Network | None = None
    dst: IPv4Network | None = None
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
CHAINS = (MASQ_CHAIN, FWD_CHAIN)


@dataclass(frozen=True)
class RuleSet:
    chains: tuple[Chain, ...]

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


NOTHING = RuleSet(())  # what cleanup installs


def rules(
    network: IPv4Network, subnet: IPv4Network, random_fully: bool, forward: bool, masq: bool = True
) -> RuleSet:
    """flannel's rules for cluster network C = `network` and this node's lease P = `subnet`:
    the masquerade chain unless `masq` is off, the forward chain if `forward` is on."""
    c, p = network, subnet
    masq_rules = (
        Rule("RETURN", kube_mark=True),
        Rule("RETURN", src=p, dst=c),  # pod to pod: no NAT
        Rule("RETURN", src=c, dst=p),
        Rule("RETURN", src=c, src_neg=True, dst=p),  # outside to a local pod (e.g. a NodePort)
        Rule("MASQUERADE", src=c, dst=MULTICAST, dst_neg=True, random_fully=random_fully),
        Rule("MASQUERADE", src=c, src_neg=True, dst=c, random_fully=random_fully),  # host to pods
    )
    chains = [replace(MASQ_CHAIN, rules=masq_rules)] if masq else []
    if forward:
        chains.append(replace(FWD_CHAIN, rules=(Rule("ACCEPT", src=c), Rule("ACCEPT", dst=c))))
    return RuleSet(tuple(chains))


# -- iptables rendering and comparison (pure) ---------------------------------------------------


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


def iptables_payload(ruleset: RuleSet, saved: Mapping[str, str] | None = None) -> str:
    """The `iptables-restore --noflush` input that turns the tables in `saved` (table name →
    `iptables-save -t` output; none for a node without our rules) into `ruleset`; our chains
    not in `ruleset` are removed. Empty when there is nothing to do."""
    saved = saved or {}
    return "".join(
        _section(t, ruleset.chain(t.name), parse_save(saved.get(t.table, ""))) for t in CHAINS
    )


def _diff(label: str, have: list[Any], want: list[Any]) -> list[str]:
    if have == want:
        return []
    missing = sum((Counter(want) - Counter(have)).values())
    extra = sum((Counter(have) - Counter(want)).values())
    parts = []
    if missing:
        parts.append(f"{missing} rule(s) missing")
    if extra:
        parts.append(f"{extra} unexpected")
    return [f"{label}: {', '.join(parts) or 'out of order'}"]


def iptables_drift(ruleset: RuleSet, saved: Mapping[str, str]) -> list[str]:
    """How the saved tables differ from `ruleset`, one phrase per difference; [] when exact."""
    out: list[str] = []
    for template in CHAINS:
        want = ruleset.chain(template.name)
        tables = parse_save(saved.get(template.table, ""))
        if want is None:
            if template.name in tables or _refs(template, tables):
                out.append(f"{template.name} should not exist")
            continue
        if want.name not in tables:
            out.append(f"{want.name} missing")
            continue
        specs = [iptables_rule(r, want.comment) for r in want.rules]
        out += _diff(want.name, tables[want.name], specs)
        copies, others = _jumps(want, tables)
        if copies != 1:
            out.append(f"{want.hook}: {copies} jumps to {want.name}, want 1")
        if others:
            out.append(f"{len(others)} other rule(s) refer to {want.name}")
    return out


# -- nftables rendering and comparison (pure) ---------------------------------------------------
#
# Two rules differ from the reference's nftables ones, which do not mean what its iptables ones
# mean: the mark test is masked (`meta mark & 0x4000 == 0x4000`, like `--mark 0x4000/0x4000`;
# the reference's exact `meta mark 0x4000` misses packets carrying other mark bits too), and
# rule 4 is `ip saddr != C ip daddr P return` (the reference has `ip saddr != P ip daddr C`,
# which returns for everything from outside P into C: every packet the last rule, `ip saddr
# != C ip daddr C masquerade` for the host to pods, would match, so that rule never matches).


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
    return _NFT_DROP + "".join(f"{line}\n" for line in lines)


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
        if base != (c.nft_type, c.nft_hook, _NFT_PRIORITY[c.nft_priority], "accept"):
            out.append(f"chain {name}: wrong type, hook, priority or policy")
        rules_have = [
            (o["rule"].get("comment"), _canonical(o["rule"].get("expr")))
            for o in listing
            if "rule" in o and o["rule"].get("chain") == name
        ]
        rules_want = [(c.comment, _canonical(nft_expr(r))) for r in c.rules]
        out += _diff(name, rules_have, rules_want)
    return out


# -- running the commands -----------------------------------------------------------------------


async def _exec(*cmd: str, stdin: str | None = None) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        raise MasqError(
            f"cannot run {cmd[0]} ({e.strerror}); install the "
            f"{_PACKAGE.get(cmd[0], 'nftables')} package"
        ) from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), CMD_TIMEOUT
        )
    except BaseException as e:  # timeout or cancellation: leave no half-run command behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(e, TimeoutError):
            raise MasqError(f"`{' '.join(cmd)}` timed out after {CMD_TIMEOUT:.0f} s") from None
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace").strip()


async def _run(*cmd: str, stdin: str | None = None) -> str:
    code, out, err = await _exec(*cmd, stdin=stdin)
    if code != 0:
        raise MasqError(f"`{' '.join(cmd)}` failed: {err or f'exit status {code}'}")
    return out


async def _iptables_version() -> tuple[tuple[int, ...], bool]:
    """(version, whether it is the nf_tables variant) from `iptables --version`."""
    out = await _run("iptables", "--version")  # "iptables v1.8.9 (nf_tables)"
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise MasqError(f"cannot read the version in `iptables --version` output {out!r}")
    return tuple(int(x) for x in m.groups()), "nf_tables" in out


async def _iptables_save() -> dict[str, str]:
    return {t: await _run("iptables-save", "-t", t) for t in sorted({c.table for c in CHAINS})}


async def _iptables_restore(payload: str, version: tuple[int, ...]) -> None:
    wait = ["--wait"] if version >= WAIT_AND_RANDOM_FULLY else []
    await _run("iptables-restore", "--noflush", *wait, stdin=payload)


async def _nft_list(table: str) -> list[dict[str, Any]] | None:
    """The objects of `nft -j list table ip <table>`, or None when there is no such table."""
    code, out, err = await _exec("nft", "-j", "list", "table", "ip", table)
    if code != 0:
        if "No such file or directory" in err:
            return None
        raise MasqError(f"`nft -j list table ip {table}` failed: {err or f'exit status {code}'}")
    try:
        return json.loads(out)["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise MasqError(f"cannot parse `nft -j list table ip {table}` output ({e})") from None


async def _nft_remove() -> None:
    await _run("nft", "-f", "-", stdin=_NFT_DROP)


async def _drop_if_empty(table: str) -> None:
    """Delete iptables-nft's `ip <table>` if it holds nothing but empty ACCEPT base chains.

    iptables-nft creates a table on first use and never deletes it; after our chains are gone
    an empty one is what is left of ours. Deleting its chains one by one in the transaction
    makes it fail, leaving everything, should someone add a rule meanwhile."""
    objs = await _nft_list(table)
    if objs is None or {k for o in objs for k in o} - {"metainfo", "table", "chain"}:
        return
    chains = [o["chain"] for o in objs if "chain" in o]
    if any(c.get("hook") is None or c.get("policy") != "accept" for c in chains):
        return
    script = [f"delete chain ip {table} {c['name']}" for c in chains] + [f"delete table ip {table}"]
    await _run("nft", "-f", "-", stdin="".join(f"{line}\n" for line in script))


async def _iptables_remove() -> None:
    """Remove our chains and every rule referring to them, then the tables this emptied."""
    version, nf_tables = await _iptables_version()
    saved = await _iptables_save()
    payload = iptables_payload(NOTHING, saved)
    if not payload:
        return
    await _iptables_restore(payload, version)
    if nf_tables and shutil.which("nft"):
        for table in re.findall(r"^\*(\w+)$", payload, re.M):
            await _drop_if_empty(table)


def detect_mode() -> str:
    """nftables when the host has `nft` and no `iptables`, iptables (legacy or nft) otherwise."""
    return NFTABLES if shutil.which("nft") and not shutil.which("iptables") else IPTABLES


class Masquerade:
    """The rules of one node: `network` is the cluster network, `subnet` this node's lease
    (assign a new one, then `ensure()`, when the lease changes); `masq` and `forward` choose
    the chains; `mode` None picks iptables or nftables by what the host has."""

    def __init__(
        self,
        network: IPv4Network,
        subnet: IPv4Network,
        *,
        forward: bool = True,
        random_fully: bool = True,
        mode: str | None = None,
        masq: bool = True,
    ) -> None:
        if mode not in (None, IPTABLES, NFTABLES):
            raise ValueError(f"mode {mode!r} must be {IPTABLES!r} or {NFTABLES!r}")
        self.network = network
        self.subnet = subnet
        self.forward = forward
        self.masq = masq
        self.random_fully = random_fully  # False: --ip-masq-fully-random-disable
        self.mode = mode or detect_mode()
        self._version: tuple[int, ...] | None = None
        self._random_fully_ok: bool | None = None
        self._last_error = ""
        self._lock = asyncio.Lock()

    async def _probe(self) -> None:
        """Once: the iptables version, and whether fully-random masquerade can be used.

        iptables: version >= 1.6.2, as the reference (go-iptables) decides; the kernel side,
        NF_NAT_RANGE_PROTO_RANDOM_FULLY, dates from Linux 3.14, older than anything this agent
        runs on, and `iptables-restore --test` would not ask the kernel anyway. nftables: a
        dry run (`nft --check`, nothing is applied) of a masquerade fully-random rule, which
        asks both nft and the kernel."""
        if self._random_fully_ok is not None:
            return
        if self.mode == IPTABLES:
            self._version = (await _iptables_version())[0]
            ok = self._version >= WAIT_AND_RANDOM_FULLY
        else:
            code, _, _ = await _exec("nft", "--check", "-f", "-", stdin=_NFT_PROBE)
            ok = code == 0
        if self.random_fully and not ok:
            log.warning("masquerade: %s has no fully-random masquerade; not using it", self.mode)
        self._random_fully_ok = ok

    async def desired(self) -> RuleSet:
        await self._probe()
        random_fully = self.random_fully and bool(self._random_fully_ok)
        return rules(self.network, self.subnet, random_fully, self.forward, self.masq)

    async def drift(self) -> list[str]:
        """How the kernel's rules differ from the desired ones; raises MasqError."""
        want = await self.desired()
        if self.mode == IPTABLES:
            return iptables_drift(want, await _iptables_save())
        return nft_drift(want, await _nft_list(NFT_TABLE))

    async def _ensure(self) -> None:
        want = await self.desired()
        if self.mode == IPTABLES:
            assert self._version is not None
            await _iptables_restore(iptables_payload(want, await _iptables_save()), self._version)
            if shutil.which("nft"):
                await _nft_remove()
        else:
            await _run("nft", "-f", "-", stdin=nft_script(want))
            if shutil.which("iptables"):
                await _iptables_remove()

    def _error(self, msg: str) -> None:
        if msg != self._last_error:  # a lasting fault logs once, not every resync period
            log.error("masquerade: %s", msg)
            self._last_error = msg

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> bool:
        async with self._lock:
            try:
                await step()
            except MasqError as e:
                self._error(str(e))
                return False
            except Exception as e:  # noqa: BLE001 - a surprise must not end the agent
                self._error(f"unexpected failure: {e!r}")
                return False
        self._last_error = ""
        return True

    async def ensure(self) -> bool:
        """Install the rules (and remove the other mode's); never raises. False after logging
        an error."""
        return await self._guarded(self._ensure)

    async def _repair(self) -> None:
        drift = await self.drift()
        if drift:
            await self._ensure()
            if still := await self.drift():  # e.g. a tool that prints rules another way
                raise MasqError(f"rules differ right after reinstalling them: {still}")
            log.info("masquerade rules repaired (%s)", "; ".join(drift))

    async def resync(self) -> bool:
        """Check, and reinstall when the rules drifted; never raises. True when the rules are
        right afterwards, False after logging an error."""
        return await self._guarded(self._repair)

    async def run(self, period: float = 5.0) -> None:
        """Resync every `period` s (`--iptables-resync`) until cancelled; `ensure()` first."""
        while True:
            await asyncio.sleep(period)
            await self.resync()

    @staticmethod
    async def cleanup() -> bool:
        """Remove every chain, rule and table of both modes that the agent added, jumps
        included; a second run finds nothing to do. False after logging an error."""
        ok = True
        for tool, remove in (("iptables", _iptables_remove), ("nft", _nft_remove)):
            if shutil.which(tool):
                try:
                    await remove()
                except MasqError as e:
                    log.error("masquerade cleanup: %s", e)
                    ok = False
        return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flanneld.edges.masq", description=__doc__)
    parser.add_argument("command", choices=("ensure", "check", "resync", "cleanup"))
    parser.add_argument("--network", type=IPv4Network, help="cluster network (FLANNEL_NETWORK)")
    parser.add_argument("--subnet", type=IPv4Network, help="this node's lease subnet")
    parser.add_argument("--mode", choices=(IPTABLES, NFTABLES), help="default: what the host has")
    parser.add_argument("--no-forward", action="store_true", help="no FLANNEL-FWD rules")
    parser.add_argument("--no-masq", action="store_true", help="no FLANNEL-POSTRTG rules")
    parser.add_argument("--no-random-fully", action="store_true", help="never --random-fully")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "cleanup":
        return 0 if asyncio.run(Masquerade.cleanup()) else 1
    if args.network is None or args.subnet is None:
        parser.error(f"{args.command} needs --network and --subnet")
    masq = Masquerade(
        args.network,
        args.subnet,
        forward=not args.no_forward,
        random_fully=not args.no_random_fully,
        mode=args.mode,
        masq=not args.no_masq,
    )

    async def check() -> bool:
        try:
            drift = await masq.drift()
        except MasqError as e:
            log.error("masquerade: %s", e)
            return False
        print("\n".join(drift) or "in sync")
        return not drift

    action = {"ensure": masq.ensure, "check": check, "resync": masq.resync}[args.command]
    return 0 if asyncio.run(action()) else 1


if __name__ == "__main__":
    sys.exit(main())
