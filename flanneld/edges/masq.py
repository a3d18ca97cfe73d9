"""Masquerade and forward rules (`--ip-masq`, `--iptables-forward-rules`) in the kernel: runs
iptables or nft to install the rule set of `flanneld.core.firewall`, repair drift and remove
it (the chains FLANNEL-POSTRTG and FLANNEL-FWD and their jumps, or table `ip flannel-ipv4`).
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

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from typing import Any, Protocol

from flanneld.core.errors import StateError
from flanneld.core.firewall import CHAINS, NOTHING, RuleSet, rules
from flanneld.core.iptables import (
    WAIT_AND_RANDOM_FULLY,
    iptables_drift,
    iptables_payload,
    parse_version,
    payload_tables,
)
from flanneld.core.nftables import (
    DROP_TABLE,
    FULLY_RANDOM_PROBE,
    NFT_TABLE,
    drop_if_empty,
    nft_drift,
    nft_script,
)

log = logging.getLogger(__name__)

IPTABLES, NFTABLES = "iptables", "nftables"
CMD_TIMEOUT = 10.0
_PACKAGE = {"iptables": "iptables", "iptables-save": "iptables", "iptables-restore": "iptables"}


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
    """iptables and nft, run through a `Runner`; every failure is a MasqError."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def run(self, *cmd: str, stdin: str | None = None) -> str:
        code, out, err = await self.runner(*cmd, stdin=stdin)
        if code != 0:
            raise MasqError(f"`{' '.join(cmd)}` failed: {err or f'exit status {code}'}")
        return out

    async def iptables_version(self) -> tuple[tuple[int, ...], bool]:
        """(version, whether it is the nf_tables variant) from `iptables --version`."""
        out = await self.run("iptables", "--version")
        found = parse_version(out)
        if found is None:
            raise MasqError(f"cannot read the version in `iptables --version` output {out!r}")
        return found

    async def iptables_save(self) -> dict[str, str]:
        tables = sorted({c.table for c in CHAINS})
        return {t: await self.run("iptables-save", "-t", t) for t in tables}

    async def iptables_restore(self, payload: str, version: tuple[int, ...]) -> None:
        wait = ["--wait"] if version >= WAIT_AND_RANDOM_FULLY else []
        await self.run("iptables-restore", "--noflush", *wait, stdin=payload)

    async def iptables_remove(self) -> None:
        """Remove our chains and every rule referring to them, then the tables this emptied."""
        version, nf_tables = await self.iptables_version()
        payload = iptables_payload(NOTHING, await self.iptables_save())
        if not payload:
            return
        await self.iptables_restore(payload, version)
        if nf_tables and shutil.which("nft"):
            for table in payload_tables(payload):
                script = drop_if_empty(table, await self.nft_list(table))
                if script:
                    await self.run("nft", "-f", "-", stdin=script)

    async def nft_list(self, table: str) -> list[dict[str, Any]] | None:
        """The objects of `nft -j list table ip <table>`, or None when there is no such table."""
        cmd = ("nft", "-j", "list", "table", "ip", table)
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
        await self.nft_apply(DROP_TABLE)


def detect_mode() -> str:
    """nftables when the host has `nft` and no `iptables`, iptables (legacy or nft) otherwise."""
    return NFTABLES if shutil.which("nft") and not shutil.which("iptables") else IPTABLES


class Masquerade:
    """The rules of one node: `network` is the cluster network, `subnet` this node's lease
    (assign a new one, then `ensure()`, when the lease changes); `masq` and `forward` choose
    the chains; `mode` None picks iptables or nftables by what the host has; `runner` runs
    the commands (None: subprocesses)."""

    def __init__(
        self,
        network: IPv4Network,
        subnet: IPv4Network,
        *,
        forward: bool = True,
        random_fully: bool = True,
        mode: str | None = None,
        masq: bool = True,
        runner: Runner | None = None,
    ) -> None:
        if mode not in (None, IPTABLES, NFTABLES):
            raise ValueError(f"mode {mode!r} must be {IPTABLES!r} or {NFTABLES!r}")
        self.network = network
        self.subnet = subnet
        self.forward = forward
        self.masq = masq
        self.random_fully = random_fully  # False: --ip-masq-fully-random-disable
        self.mode = mode or detect_mode()
        self._tools = _Tools(runner or SubprocessRunner())
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
            self._version = (await self._tools.iptables_version())[0]
            ok = self._version >= WAIT_AND_RANDOM_FULLY
        else:
            code, _, _ = await self._tools.runner(
                "nft", "--check", "-f", "-", stdin=FULLY_RANDOM_PROBE
            )
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
            return iptables_drift(want, await self._tools.iptables_save())
        return nft_drift(want, await self._tools.nft_list(NFT_TABLE))

    async def _ensure(self) -> None:
        want = await self.desired()
        tools = self._tools
        if self.mode == IPTABLES:
            assert self._version is not None
            await tools.iptables_restore(
                iptables_payload(want, await tools.iptables_save()), self._version
            )
            if shutil.which("nft"):
                await tools.nft_remove()
        else:
            await tools.nft_apply(nft_script(want))
            if shutil.which("iptables"):
                await tools.iptables_remove()

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

    async def check(self) -> list[str] | None:
        """How the kernel's rules differ from the desired ones, [] when they are exact; never
        raises. None after logging an error."""
        found: list[str] = []

        async def step() -> None:
            found.extend(await self.drift())

        return found if await self._guarded(step) else None

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
    async def cleanup(runner: Runner | None = None) -> bool:
        """Remove every chain, rule and table of both modes that the agent added, jumps
        included; a second run finds nothing to do. False after logging an error."""
        tools = _Tools(runner or SubprocessRunner())
        ok = True
        for tool, remove in (("iptables", tools.iptables_remove), ("nft", tools.nft_remove)):
            if shutil.which(tool):
                try:
                    await remove()
                except MasqError as e:
                    log.error("masquerade cleanup: %s", e)
                    ok = False
        return ok
