"""The deployment files read as text: the systemd unit's settings and hardening, the env sample
against the flags, the scripts' mode bits, the Vagrantfile's providers. No tool runs and no root
is needed (moved from tests/integration/test_deploy_files.py, which keeps the checks that run
systemd-analyze, bash, shellcheck, vagrant and install.sh)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from flanneld.core.options import Options, parse_options

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "flanneld.service"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))


def directives(text: str) -> dict[str, list[str]]:
    """Key → values of a unit file (keys repeat in systemd units)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_runs_the_agent_as_a_hardened_notify_service():
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"].split()[0] == "/usr/local/bin/flanneld"
    assert "network-online.target" in one["After"] and "network-online.target" in one["Wants"]
    assert "docker.service" in one["Before"]
    assert one["Restart"] == "always" and one["EnvironmentFile"] == "-/etc/default/flanneld"
    # subnet.env and the state dir where the agent's defaults put them, writable under
    # ProtectSystem=strict, and subnet.env kept across a stop like the reference's file
    assert Path(Options().subnet_file).parent == Path("/run") / one["RuntimeDirectory"]
    assert Path(Options().state_dir) == Path("/var/lib") / one["StateDirectory"]
    assert one["RuntimeDirectoryPreserve"] == "yes"
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(one[key].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert one["DeviceAllow"] == "/dev/net/tun rw"
    assert set(one["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["ProtectHome"] == "yes" and one["PrivateTmp"] == "yes"
    # it needs the host's network namespace and /dev/net/tun
    assert "PrivateNetwork" not in d and "PrivateDevices" not in d


def sample_variables() -> dict[str, str]:
    pattern = re.compile(r"^#?(FLANNELD_[A-Z0-9_]+)=(.*)$", re.M)
    return dict(pattern.findall((DEPLOY / "flanneld.env.sample").read_text()))


def test_env_sample_documents_every_flag_with_its_default():
    variables = sample_variables()
    flags = {"FLANNELD_" + name.upper() for name in vars(Options()) if name != "version"}
    assert set(variables) == flags
    assert parse_options([], environ=variables) == Options()


def test_runnable_scripts_are_executable():
    for script in SCRIPTS:
        if script.name != "setup-env.sh":  # sourced, not run
            assert os.access(script, os.X_OK), f"chmod +x {script}"


def test_vagrantfile_covers_both_providers_and_pins_the_interface():
    """`validate -p` skips provider blocks, so check them and the provisioning by reading."""
    text = (ROOT / "Vagrantfile").read_text()
    assert "provider :libvirt" in text and "provider :virtualbox" in text
    assert 'ENV.fetch("NODES", "3")' in text and 'ENV.fetch("BACKEND"' in text
    provision = (DEPLOY / "vagrant-provision.sh").read_text()
    assert "FLANNELD_IFACE=$NODE_IP" in provision and "deploy/install.sh" in provision
    assert "systemctl enable" in provision
    assert ".vagrant/" in (ROOT / ".gitignore").read_text().split()
