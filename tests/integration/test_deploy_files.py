"""The deployment files through their tools: the systemd unit passes `systemd-analyze verify`
with nothing on stderr and keeps a low exposure, every shell script parses (bash -n,
shellcheck), the Vagrantfile passes `vagrant validate -p`, and install.sh puts everything in
place under a temporary root. What needs no tool (the unit's settings read as text, the env
sample against the flags, mode bits, the Vagrantfile's providers) is in
tests/unit/test_deploy_files_text.py."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "flanneld.service"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (deploy/run-tests.sh installs it)")
    return path


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy whose programs point at ones that exist here."""
    text = unit_text.replace(
        "/usr/local/bin/flanneld", str(Path(sys.executable).parent / "flanneld")
    ).replace("/usr/local/bin/mk-docker-opts", str(DEPLOY / "mk-docker-opts.sh"))
    copy = tmp_path / "flanneld.service"
    copy.write_text(text)
    return subprocess.run(
        [need("systemd-analyze"), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the unit ---------------------------------------------------------------------------------


def test_unit_verifies_with_empty_stderr(tmp_path):
    res = verify(UNIT.read_text(), tmp_path)
    assert (res.returncode, res.stderr) == (0, "")


def test_verify_would_catch_a_typo(tmp_path):
    """systemd-analyze only warns about bad values (rc 0): the stderr check is what counts."""
    res = verify(UNIT.read_text().replace("Type=notify", "Type=notifyy"), tmp_path)
    assert "notifyy" in res.stderr


def test_unit_exposure_stays_low(tmp_path):
    copy = tmp_path / "flanneld.service"
    copy.write_text(UNIT.read_text())
    res = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for flanneld.service: ([\d.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 3.0, res.stdout  # 2.6 when written; 10 is no hardening


# -- shell scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert (res.returncode, res.stderr) == (0, "")
    assert "set -euo pipefail" in script.read_text() or script.name == "setup-env.sh"


def test_scripts_pass_shellcheck():
    res = subprocess.run(
        [need("shellcheck"), "-x", *(str(s.relative_to(ROOT)) for s in SCRIPTS)],
        cwd=ROOT,  # where the scripts' `source deploy/setup-env.sh` resolves
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# -- Vagrant ------------------------------------------------------------------------------------


def vagrant_validate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`vagrant validate -p` on a copy (it creates .vagrant/ next to the Vagrantfile)."""
    (tmp_path / "deploy").mkdir(exist_ok=True)
    shutil.copy(ROOT / "Vagrantfile", tmp_path)
    shutil.copy(DEPLOY / "vagrant-provision.sh", tmp_path / "deploy")
    return subprocess.run(
        [need("vagrant"), "validate", "-p"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
            **env,
        },
    )


@pytest.mark.parametrize(("nodes", "backend"), [("3", "vxlan"), ("5", "host-gw"), ("1", "udp")])
def test_vagrantfile_validates(tmp_path, nodes, backend):
    res = vagrant_validate(tmp_path, NODES=nodes, BACKEND=backend)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
    assert res.stdout.count("Ignoring provider config") == int(nodes)


def test_vagrantfile_refuses_an_unknown_backend(tmp_path):
    res = vagrant_validate(tmp_path, BACKEND="gre")
    assert res.returncode != 0
    assert "BACKEND must be host-gw, vxlan or udp, not gre" in res.stdout + res.stderr


# -- install.sh ---------------------------------------------------------------------------------


def install(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_install_into_a_temporary_root(tmp_path):
    root = tmp_path / "root"
    res = install(root)
    assert res.returncode == 0, res.stdout + res.stderr

    link = root / "usr/local/bin/flanneld"
    assert link.is_symlink() and os.readlink(link) == "/opt/flanneld/bin/flanneld"
    version = subprocess.run(
        [str(root / "opt/flanneld/bin/flanneld"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert version.returncode == 0 and version.stderr.strip() == "0.1.0"
    mk = root / "usr/local/bin/mk-docker-opts"
    assert mk.read_bytes() == (DEPLOY / "mk-docker-opts.sh").read_bytes()
    assert os.access(mk, os.X_OK)
    unit = root / "etc/systemd/system/flanneld.service"
    assert unit.read_text() == UNIT.read_text()
    env_file = root / "etc/default/flanneld"
    assert env_file.read_text() == (DEPLOY / "flanneld.env.sample").read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it may hold the etcd password

    # a second run upgrades in place and keeps the administrator's settings
    env_file.write_text("FLANNELD_IFACE=eth1\n")
    res = install(root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keeping" in res.stdout
    assert env_file.read_text() == "FLANNELD_IFACE=eth1\n"
