"""Masquerade and forward rules (`--ip-masq`, `--iptables-forward-rules`) in the kernel: runs
iptables or nft to install the rule set of `flanneld.core.firewall`, repair drift and remove
it (the chains FLANNEL-POSTRTG and FLANNEL-FWD and their jumps, or table `ip flannel-ipv4`);
on a dual-stack node the same for IPv6 (ip6tables, or table `ip6 flannel-ipv6`).
"""

# Theory of operation.
#
# What to install and how it differs from what is there is decided in the core
# (`flanneld.core.iptables`, `flanneld.core.nftables`); this module reads the kernel's tables
# (`iptables-save`, `nft -j list`), hands them to the core and feeds its output back
# (`iptables-restore --noflush`, `nft -f`). Every command goes through a `Runner`: by default
# a subprocess, in tests a fake that answers like the tools.
#
# `Masquerade` holds one node's rules: `ensure()` installs, `check()` compares, `resync()`
# repairs when they differ, `cleanup()` removes everything of both modes. Errors end in one log
# line naming the command and its stderr; nothing raises out of them.
#
# IPv4 and IPv6 are two independent halves (`_Family`): each has its own tools (iptables or
# ip6tables, nft tables `ip` or `ip6`), its own mode (chosen the same way, by what the host has)
# and its own probe, and is installed, checked and repaired on its own, IPv4 first. A failure in
# one half is logged (IPv6 lines say so) and does not keep the other half from its turn. Without
# an IPv6 network, nothing of IPv6 is run: an IPv4-only node behaves exactly as before.

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Protocol

from flanneld.core.errors import StateError
from flanneld.core.firewall import CHAINS, FAMILIES, NOTHING, RuleSet, rules
from flanneld.core.iptables import (
    WAIT_AND_RANDOM_FULLY,
    iptables_drift,
    iptables_payload,
    parse_version,
    payload_tables,
)
from flanneld.core.nftables import (
    NFT_FAMILY,
    NFT_TABLES,
    drop_if_empty,
    drop_table,
    fully_random_probe,
    nft_drift,
    nft_script,
)

log = logging.getLogger(__name__)

IPTABLES, NFTABLES = "iptables", "nftables"
CMD_TIMEOUT = 10.0
_PACKAGE = {
    f"{tool}{suffix}": "iptables"
    for tool in ("iptables", "ip6tables")
    for suffix in ("", "-save", "-restore")
}


class MasqError(StateError):
    """A command failed; the message names it and its stderr."""


class Runner(Protocol):
    """Runs one command with `stdin` (None: no input) and returns (exit status, stdout, stderr
    without surrounding blanks); raises MasqError when the command cannot be run or does not
    finish."""

    async def __call__(self, *cmd: str, stdin: str | None = None) -> tuple[int, str, str]: ...


class SubprocessRunner:
    """The default `Runner`: a child process, killed after `timeout` seconds."""

    def __init__(self, timeout: float = CMD_TIMEOUT) -> None:
        self.timeout = timeout

    async def __call__(self, *cmd: str, stdin: str | None = None) -> tuple[int, str, str]:
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
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout
            )
        except BaseException as e:  # timeout or cancellation: leave no half-run command behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(e, TimeoutError):
                raise MasqError(f"`{' '.join(cmd)}` timed out after {self.timeout:g} s") from None
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace").strip()


class _Tools:
    """iptables and nft (for `family` 6: ip6tables, and nft's `ip6` tables), run through a
    `Runner`; every failure is a MasqError."""

    def __init__(self, runner: Runner, family: int = 4) -> None:
        self.runner = runner
        self.family = family
        self.iptables = "iptables" if family == 4 else "ip6tables"
        self.nft_family = NFT_FAMILY[family]
        self.nft_table = NFT_TABLES[family]

    async def run(self, *cmd: str, stdin: str | None = None) -> str:
        code, out, err = await self.runner(*cmd, stdin=stdin)
        if code != 0:
            raise MasqError(f"`{' '.join(cmd)}` failed: {err or f'exit status {code}'}")
        return out

    async def iptables_version(self) -> tuple[tuple[int, ...], bool]:
        """(version, whether it is the nf_tables variant) from `iptables --version`."""
        out = await self.run(self.iptables, "--version")
        found = parse_version(out)
        if found is None:
            raise MasqError(
                f"cannot read the version in `{self.iptables} --version` output {out!r}"
            )
        return found

    async def iptables_save(self) -> dict[str, str]:
        tables = sorted({c.table for c in CHAINS})
        return {t: await self.run(f"{self.iptables}-save", "-t", t) for t in tables}

    async def iptables_restore(self, payload: str, version: tuple[int, ...]) -> None:
        wait = ["--wait"] if version >= WAIT_AND_RANDOM_FULLY else []
        await self.run(f"{self.iptables}-restore", "--noflush", *wait, stdin=payload)

    async def iptables_remove(self) -> None:
        """Remove our chains and every rule referring to them, then the tables this emptied."""
        version, nf_tables = await self.iptables_version()
        payload = iptables_payload(NOTHING, await self.iptables_save(), self.family)
        if not payload:
            return
        await self.iptables_restore(payload, version)
        if nf_tables and shutil.which("nft"):
            for table in payload_tables(payload):
                script = drop_if_empty(table, await self.nft_list(table), self.family)
                if script:
                    await self.run("nft", "-f", "-", stdin=script)

    async def nft_list(self, table: str) -> list[dict[str, Any]] | None:
        """The objects of `nft -j list table ip <table>` (`ip6` for IPv6), or None when there is
        no such table."""
        cmd = ("nft", "-j", "list", "table", self.nft_family, table)
        code, out, err = await self.runner(*cmd)
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise MasqError(f"`{' '.join(cmd)}` failed: {err or f'exit status {code}'}")
        try:
            return json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise MasqError(f"cannot parse `{' '.join(cmd)}` output ({e})") from None

    async def nft_apply(self, script: str) -> None:
        await self.run("nft", "-f", "-", stdin=script)

    async def nft_remove(self) -> None:
        await self.nft_apply(drop_table(self.family))


def detect_mode(family: int = 4) -> str:
    """nftables when the host has `nft` and no `iptables` (`ip6tables` for `family` 6),
    iptables (legacy or nft) otherwise."""
    tool = "iptables" if family == 4 else "ip6tables"
    return NFTABLES if shutil.which("nft") and not shutil.which(tool) else IPTABLES


def ipv6_kernel() -> bool:
    """Whether this kernel has IPv6 at all (not booted with ipv6.disable=1): without it there
    can be no IPv6 rules to remove, and ip6tables would only fail."""
    return Path("/proc/net/if_inet6").exists()


class _Family:
    """One address family's half of a node's rules: its mode, its tools, what its probe found,
    and the last error it logged."""

    def __init__(self, family: int, mode: str, runner: Runner) -> None:
        self.family = family
        self.mode = mode
        self.tools = _Tools(runner, family)
        self.label = "" if family == 4 else "IPv6: "  # in its log lines
        self.version: tuple[int, ...] | None = None
        self.random_fully_ok: bool | None = None
        self.last_error = ""

    async def probe(self, wanted: bool) -> bool:
        """Once: the iptables version, and whether fully-random masquerade can be used (warned
        about when `wanted` and not).

        iptables: version >= 1.6.2, as the reference (go-iptables) decides; the kernel side,
        NF_NAT_RANGE_PROTO_RANDOM_FULLY, dates from Linux 3.14, older than anything this agent
        runs on, and `iptables-restore --test` would not ask the kernel anyway. nftables: a
        dry run (`nft --check`, nothing is applied) of a masquerade fully-random rule, which
        asks both nft and the kernel."""
        if self.random_fully_ok is None:
            if self.mode == IPTABLES:
                self.version = (await self.tools.iptables_version())[0]
                ok = self.version >= WAIT_AND_RANDOM_FULLY
            else:
                code, _, _ = await self.tools.runner(
                    "nft", "--check", "-f", "-", stdin=fully_random_probe(self.family)
                )
                ok = code == 0
            if wanted and not ok:
                log.warning(
                    "masquerade: %s%s has no fully-random masquerade; not using it",
                    self.label,
                    self.mode,
                )
            self.random_fully_ok = ok
        return self.random_fully_ok

    async def drift(self, want: RuleSet) -> list[str]:
        """How this family's rules in the kernel differ from its chains in `want`."""
        tools = self.tools
        if self.mode == IPTABLES:
            return iptables_drift(want, await tools.iptables_save(), self.family)
        return nft_drift(want, await tools.nft_list(tools.nft_table), self.family)

    async def ensure(self, want: RuleSet) -> None:
        """Install this family's chains of `want` and remove this family's of the other mode;
        `probe()` first."""
        tools = self.tools
        if self.mode == IPTABLES:
            assert self.version is not None
            payload = iptables_payload(want, await tools.iptables_save(), self.family)
            await tools.iptables_restore(payload, self.version)
            if shutil.which("nft"):
                await tools.nft_remove()
        else:
            await tools.nft_apply(nft_script(want, self.family))
            if shutil.which(tools.iptables):
                await tools.iptables_remove()

    def error(self, msg: str) -> None:
        if msg != self.last_error:  # a lasting fault logs once, not every resync period
            log.error("masquerade: %s%s", self.label, msg)
            self.last_error = msg


class Masquerade:
    """The rules of one node: `network` is the cluster network, `subnet` this node's lease
    (assign a new one, then `ensure()`, when the lease changes); `network6` and `subnet6`, both
    or neither, the same for IPv6 on a dual-stack node (None: no IPv6 rules, and ip6tables is
    never run); `masq` and `forward` choose the chains; `mode` None picks iptables or nftables
    by what the host has, for each family; `runner` runs the commands (None: subprocesses)."""

    def __init__(
        self,
        network: IPv4Network | None,
        subnet: IPv4Network,
        *,
        forward: bool = True,
        random_fully: bool = True,
        mode: str | None = None,
        masq: bool = True,
        runner: Runner | None = None,
        network6: IPv6Network | None = None,
        subnet6: IPv6Network | None = None,
    ) -> None:
        if mode not in (None, IPTABLES, NFTABLES):
            raise ValueError(f"mode {mode!r} must be {IPTABLES!r} or {NFTABLES!r}")
        if (network6 is None) != (subnet6 is None):
            raise ValueError("network6 and subnet6 go together: both for IPv6 rules, or neither")
        self.network = network
        self.subnet = subnet
        self.network6 = network6
        self.subnet6 = subnet6
        self.forward = forward
        self.masq = masq
        self.random_fully = random_fully  # False: --ip-masq-fully-random-disable
        runner = runner or SubprocessRunner()
        self._v4 = _Family(4, mode or detect_mode(4), runner)
        self._v6 = _Family(6, mode or detect_mode(6), runner)
        self._lock = asyncio.Lock()

    @property
    def mode(self) -> str:
        """iptables or nftables, for the IPv4 rules."""
        return self._v4.mode

    @property
    def mode6(self) -> str:
        """iptables (that is, ip6tables) or nftables, for the IPv6 rules."""
        return self._v6.mode

    def _families(self) -> list[_Family]:
        """IPv4 unless the network is IPv6-only, and IPv6 when it has an IPv6 network."""
        v4 = [self._v4] if self.network is not None else []
        return v4 + [self._v6] if self.network6 is not None else v4

    async def desired(self, family: int | None = None) -> RuleSet:
        """The rules wanted, of every family of the node or of `family` alone (which probes
        that family's tools only)."""
        fams = self._families() if family is None else [self._v4 if family == 4 else self._v6]
        ok = {f.family: await f.probe(self.random_fully) for f in fams}  # always: the version
        rf = {family: self.random_fully and usable for family, usable in ok.items()}
        v6 = 6 in rf
        want = rules(
            self.network,
            self.subnet,
            rf.get(4, False),
            self.forward,
            self.masq,
            network6=self.network6 if v6 else None,
            subnet6=self.subnet6 if v6 else None,
            random_fully6=rf.get(6),
        )
        return want if family is None else want.family(family)

    async def drift(self) -> list[str]:
        """How the kernel's rules differ from the desired ones, IPv4's then IPv6's; raises
        MasqError."""
        out: list[str] = []
        for fam in self._families():
            out += await fam.drift(await self.desired(fam.family))
        return out

    async def _each(self, step: Callable[[_Family], Awaitable[None]]) -> bool:
        """`step` for each family in turn: a failure is logged (once while it lasts) and keeps
        no other family from its turn. False when any failed."""
        ok = True
        async with self._lock:
            for fam in self._families():
                try:
                    await step(fam)
                except MasqError as e:
                    fam.error(str(e))
                    ok = False
                    continue
                except Exception as e:  # noqa: BLE001 - a surprise must not end the agent
                    fam.error(f"unexpected failure: {e!r}")
                    ok = False
                    continue
                fam.last_error = ""
        return ok

    async def _ensure(self, fam: _Family) -> None:
        await fam.ensure(await self.desired(fam.family))

    async def ensure(self) -> bool:
        """Install the rules (and remove the other mode's); never raises. False after logging
        an error."""
        return await self._each(self._ensure)

    async def check(self) -> list[str] | None:
        """How the kernel's rules differ from the desired ones, [] when they are exact; never
        raises. None after logging an error."""
        found: list[str] = []

        async def step(fam: _Family) -> None:
            found.extend(await fam.drift(await self.desired(fam.family)))

        return found if await self._each(step) else None

    async def _repair(self, fam: _Family) -> None:
        want = await self.desired(fam.family)
        drift = await fam.drift(want)
        if drift:
            await fam.ensure(want)
            if still := await fam.drift(want):  # e.g. a tool that prints rules another way
                raise MasqError(f"rules differ right after reinstalling them: {still}")
            log.info("masquerade rules repaired (%s)", "; ".join(drift))

    async def resync(self) -> bool:
        """Check, and reinstall when the rules drifted; never raises. True when the rules are
        right afterwards, False after logging an error."""
        return await self._each(self._repair)

    async def run(self, period: float = 5.0) -> None:
        """Resync every `period` s (`--iptables-resync`) until cancelled; `ensure()` first."""
        while True:
            await asyncio.sleep(period)
            await self.resync()

    @staticmethod
    async def cleanup(runner: Runner | None = None) -> bool:
        """Remove every chain, rule and table of both modes and both families that the agent
        added, jumps included; a second run finds nothing to do. False after logging an
        error."""
        runner = runner or SubprocessRunner()
        ok = True
        for family in FAMILIES:
            if family == 6 and not ipv6_kernel():
                continue
            tools = _Tools(runner, family)
            label = "" if family == 4 else "IPv6: "
            removers = ((tools.iptables, tools.iptables_remove), ("nft", tools.nft_remove))
            for tool, remove in removers:
                if shutil.which(tool):
                    try:
                        await remove()
                    except MasqError as e:
                        log.error("masquerade cleanup: %s%s", label, e)
                        ok = False
        return ok
