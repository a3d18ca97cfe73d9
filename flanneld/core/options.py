"""The agent's options: flannel's flag names and defaults, each also read from `FLANNELD_<NAME>`.

Like the reference, flags may be written with one or two dashes and `--flag=value`; a flag
given on the command line wins over its environment variable; a repeatable flag's variable
adds one value. A bad value ends with one line naming the flag and the fix (exit 2).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from flanneld.core.errors import InputError

ENV_PREFIX = "FLANNELD_"
# in --state-dir
SOCKET_NAME = "flanneld.sock"  # /status and /metrics for flannelctl
SAVED_CONFIG = "network-config.json"  # the last good network config, for restarts


class FlagError(InputError):
    pass


def parse_bool(v: str | bool) -> bool:
    """A boolean flag or environment value: 1/t/true/yes/on, 0/f/false/no/off or empty."""
    if isinstance(v, bool):
        return v
    low = v.strip().lower()
    if low in ("1", "t", "true", "yes", "on"):
        return True
    if low in ("0", "f", "false", "no", "off", ""):
        return False
    raise FlagError(f"{v!r} is not a boolean; use true or false")


@dataclass
class Options:
    etcd_endpoints: str = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    iface: list[str] = field(default_factory=list)
    iface_regex: list[str] = field(default_factory=list)
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    state_dir: str = "/var/lib/flanneld"
    reconcile_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "text"
    version: bool = False


_HELP = {
    "etcd_endpoints": "comma-separated list of etcd endpoints, tried in order with fail-over",
    "etcd_prefix": "etcd prefix: config at <prefix>/config, leases at <prefix>/subnets/",
    "etcd_keyfile": "TLS client key file for etcd",
    "etcd_certfile": "TLS client certificate file for etcd",
    "etcd_cafile": "TLS CA file to verify etcd's certificate",
    "etcd_username": "username for etcd authentication",
    "etcd_password": "password for etcd authentication",
    "iface": "interface (name or IP) to use for inter-host traffic; repeatable, first match wins",
    "iface_regex": "regex matched against interface IPs, then names; repeatable",
    "public_ip": "IP address advertised to other nodes (default: the interface's address)",
    "public_ipv6": "IPv6 address advertised to other nodes with EnableIPv6 (default: the "
    "interface's global IPv6 address)",
    "subnet_file": "file to write the subnet variables to (read back to reuse the lease)",
    "subnet_lease_renew_margin": "renew the lease this many minutes before it expires (1..1439)",
    "ip_masq": "set up IP masquerade for traffic leaving the flannel network",
    "ip_masq_fully_random_disable": "do not add --random-fully to the masquerade rules",
    "iptables_resync": "seconds between two checks (and repairs) of the masquerade/forward rules",
    "iptables_forward_rules": "add FORWARD accept rules for the flannel network",
    "healthz_ip": "address the /healthz and /readyz server listens on",
    "healthz_port": "port of the /healthz and /readyz server (0 disables it)",
    "state_dir": "directory for what the agent persists between runs",
    "reconcile_interval": "seconds between two full reconciles of the kernel state",
    "log_level": "debug, info, warning or error",
    "log_format": "text, or json (one object per line: time, level, logger, msg)",
    "version": "print the version and exit",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flanneld",
        description="flannel-compatible overlay network agent. Every flag can also be set "
        "through the environment variable FLANNELD_<FLAG> (dashes as underscores).",
        allow_abbrev=False,
    )
    for name, default in Options().__dict__.items():
        flag = name.replace("_", "-")
        names = [f"--{flag}", f"-{flag}"]
        kw: dict = {"dest": name, "default": None, "help": _HELP[name]}
        if isinstance(default, bool):
            kw.update(nargs="?", const="true", metavar="BOOL")
        elif isinstance(default, list):
            kw.update(action="append", metavar="VALUE")
        else:
            kw.update(metavar=type(default).__name__.upper())
        p.add_argument(*names, **kw)
    return p


def _convert(name: str, raw: str | bool, default: object) -> object:
    try:
        if isinstance(default, bool):
            return parse_bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except (FlagError, ValueError):
        kind = type(default).__name__
        raise FlagError(f"--{name.replace('_', '-')}: {raw!r} is not a valid {kind}") from None


def parse_options(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    env = os.environ if environ is None else environ
    ns = _parser().parse_args(argv)
    opts = Options()
    for name, default in Options().__dict__.items():
        given = getattr(ns, name)
        env_value = env.get(ENV_PREFIX + name.upper(), "")
        if isinstance(default, list):
            values = list(given or [])
            if not values and env_value:
                values = [env_value]
            setattr(opts, name, values)
            continue
        if given is None and env_value:
            given = env_value
        if given is not None:
            setattr(opts, name, _convert(name, given, default))
    if not 1 <= opts.subnet_lease_renew_margin <= 1439:
        raise FlagError("--subnet-lease-renew-margin must be between 1 and 1439 minutes")
    if not 0 <= opts.healthz_port <= 65535:
        raise FlagError("--healthz-port must be between 0 and 65535")
    if opts.iptables_resync <= 0:
        raise FlagError("--iptables-resync must be a positive number of seconds")
    if not 0.1 <= opts.reconcile_interval <= 86400:  # also refuses nan and inf
        raise FlagError("--reconcile-interval must be from 0.1 to 86400 seconds")
    if opts.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise FlagError("--log-level must be debug, info, warning or error")
    if opts.log_format not in ("text", "json"):
        raise FlagError("--log-format must be text or json")
    return opts
