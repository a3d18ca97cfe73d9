"""The VM lab as a user runs it: `deploy/vmlab.sh --nodes 2 --backend vxlan` boots two Debian
12 VMs with real systemd, installs the agent with deploy/install.sh through the Vagrant
provisioner, puts Docker on the flannel subnet, and must pass every check of its table; no
namespace, VM or run directory of it may be left. Skipped, saying why, where /dev/kvm does not
work (where KVM is PVM and cannot run Debian's kernel, the lab emulates the VMs with TCG).

Also, without VMs: how the lab judges a ping stream, reads the README's drop-in and the
Vagrantfile's synced folder, and turns bad input into one line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from deploy.vmlab import cli, image, scenario
from deploy.vmlab.cli import BadInput, kvm_state
from deploy.vmlab.scenario import CHECKS, Scenario

ROOT = Path(__file__).resolve().parents[2]
LAB_TIMEOUT = 1500  # s: a cold image build (about 75 s) and the lab under TCG (about 8 min)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def table(out: str) -> dict[str, list[str]]:
    """check -> its cells (one per VM) from the lab's table."""
    rows = {}
    for line in out.splitlines():
        for check in CHECKS:
            if line.startswith(f"  {check}  "):
                rows[check] = line[len(check) + 2 :].split()
    return rows


@pytest.fixture
def need_vms():
    if os.geteuid() != 0:
        pytest.skip("VM lab skipped: it needs root (a network namespace, taps, QEMU)")
    why = kvm_state()
    if why:
        pytest.skip(f"VM lab skipped: {why} (it runs where /dev/kvm works)")


def test_two_vms_vxlan_every_check_passes_and_nothing_is_left(need_vms):
    cache = Path(os.environ.get("VMLAB_CACHE", image.DEFAULT_CACHE))
    res = subprocess.run(
        [str(ROOT / "deploy" / "vmlab.sh"), "--nodes", "2", "--backend", "vxlan"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LAB_TIMEOUT,
    )
    out = res.stdout + res.stderr
    print(out)  # the progress lines and the table, for the record (pytest -s)
    assert res.returncode == 0, out
    assert "flanneld-py VM lab: 2 VMs, backend vxlan" in out
    assert table(out) == {check: ["ok", "ok"] for check in CHECKS}, out
    assert f"all {len(CHECKS)} checks passed on 2 VMs" in out
    assert re.search(r"times: image (built|cached) \d+ s, boot \d+ s", out), out
    # torn down: no namespace, QEMU or run directory of this run is left (other runs may be up)
    prefix = re.search(r"lab (vl[0-9a-f]{6}): namespace", out).group(1)
    assert f"{prefix}-net" not in namespaces()
    assert not (cache / "runs" / prefix).exists()
    qemus = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    assert f"-name {prefix}-" not in qemus.stdout


# -- without VMs -------------------------------------------------------------------------------


def judge(backend: str, out: str) -> tuple[bool, str]:
    sc = Scenario([], backend, print, 1.0)
    return sc.stream_result(out)


def stream(seqs: list[int], sent: int) -> str:
    lines = [f"64 bytes from 10.244.2.2: seq={s} ttl=62 time=0.5 ms" for s in seqs]
    return "\n".join([*lines, f"{sent} packets transmitted, {len(seqs)} packets received"])


def test_a_stream_passes_only_when_every_echo_but_the_last_in_flight_was_answered():
    assert judge("vxlan", stream(list(range(200)), 200))[0]
    assert judge("vxlan", stream(list(range(199)), 200))[0]  # the last, stopped in flight
    ok, why = judge("host-gw", stream([s for s in range(200) if s != 77], 200))
    assert not ok and "lost seq [77]" in why
    assert not judge("vxlan", stream(list(range(20)), 20))[0]  # too short to cover restarts
    assert not judge("vxlan", "ping: sendto: Network unreachable")[0]
    # udp loses echoes while flannel0 is gone: answered again afterwards is what counts
    assert judge("udp", stream([*range(50), *range(90, 150)], 150))[0]
    assert not judge("udp", stream(list(range(50)), 150))[0]


def test_the_lab_uses_the_readme_drop_in_and_the_vagrantfile_synced_folder():
    dropin = scenario.docker_dropin()
    assert "EnvironmentFile=/run/flannel/docker_opts.env" in dropin
    assert dropin.splitlines()[-1].startswith("ExecStart=dockerd ")  # not /usr/bin: Debian
    assert scenario.rsync_excludes() == [".git/", ".venv/", ".vagrant/", "build/", "*.egg-info/"]


def test_bad_input_is_one_line_naming_cause_and_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "kvm_state", lambda: "/dev/kvm: No such file or directory")
    with pytest.raises(BadInput, match=r"^/dev/kvm: No such .*--accel tcg") as e:
        cli.choose_accel("auto", print)
    assert "\n" not in str(e.value)
    assert cli.choose_accel("tcg", print) == "tcg"

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2000000 kB\nMemAvailable: 1500000 kB\n")
    real_path = cli.Path
    monkeypatch.setattr(cli, "Path", lambda p: meminfo if p == "/proc/meminfo" else real_path(p))
    with pytest.raises(BadInput, match=r"^1464 MiB of memory available, 3072 MiB needed .*nodes"):
        cli.preflight(2, tmp_path)


def test_a_failed_image_build_names_the_cause_and_the_fix(tmp_path):
    log = tmp_path / "build.log"
    with pytest.raises(image.ImageError, match=r"^the image build \(mmdebstrap\) failed .*") as e:
        image._run(
            ["sh", "-c", "echo 'E: Failed to fetch bookworm'; exit 1"],
            log,
            10,
            "the image build (mmdebstrap)",
            "check the network to the Debian mirror",
        )
    assert "Failed to fetch" in str(e.value) and str(e.value).endswith("Debian mirror")
