"""deploy/mk-docker-opts.sh: subnet.env in, Docker daemon options out, as flannel's
dist/mk-docker-opts.sh (its cases from dist/mk_docker_opts_test.go, plus the inverted
--ip-masq, a stale route, bad input). Pure shell on temp files; a fake `ip` on PATH stands in
for the routing table."""

from __future__ import annotations

import os
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flanneld.edges import subnetenv

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "mk-docker-opts.sh"
SAMPLE = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\n"
ALL = (
    'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
    'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
    'DOCKER_OPT_MTU="--mtu=1472"\n'
)


def run(
    tmp_path: Path,
    env_text: str | None,
    *flags: str,
    routes: str = "",
    environ: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the script on `env_text` as subnet.env; `routes` is what `ip route show` prints."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake_ip = bindir / "ip"
    fake_ip.write_text(f"#!/bin/sh\necho \"$*\" >>{tmp_path}/ip.calls\nprintf '%s' '{routes}'\n")
    fake_ip.chmod(0o755)
    subnet_env, out = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    if env_text is not None:
        subnet_env.write_text(env_text)
    out.unlink(missing_ok=True)
    res = subprocess.run(
        ["bash", str(SCRIPT), "-f", str(subnet_env), "-d", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": f"{bindir}:/usr/bin:/bin", **(environ or {})},
        cwd=tmp_path,  # where a command smuggled in as `touch pwned` would leave its marker
    )
    return res, out.read_text() if out.exists() else ""


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ((), ALL + 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (("-i",), ALL),
        (("-c",), 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (
            ("-k", "CUSTOM_KEY"),
            ALL + 'CUSTOM_KEY=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
        ),
        (
            ("-m",),
            'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
            'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n',
        ),
    ],
)
def test_reference_cases(tmp_path, flags, want):
    res, out = run(tmp_path, SAMPLE + "FLANNEL_IPMASQ=false\n", *flags)
    assert res.returncode == 0, res.stderr
    assert out == want


def test_agent_masquerading_turns_docker_masquerading_off(tmp_path):
    text = subnetenv.render(
        IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1450, ipmasq=True
    )
    res, out = run(tmp_path, text)
    assert res.returncode == 0, res.stderr
    assert out == (
        'DOCKER_OPT_BIP="--bip=10.244.7.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450"\n'
    )
    assert (tmp_path / "ip.calls").read_text() == "route show exact 10.244.7.0/24\n"


def test_existing_options_come_first_and_quotes_are_read(tmp_path):
    text = 'FLANNEL_SUBNET="10.1.74.1/24"\r\nFLANNEL_MTU=1472\n# comment\n'
    res, out = run(tmp_path, text, "-c", environ={"DOCKER_OPTS": "--debug"})
    assert res.returncode == 0, res.stderr
    assert out == 'DOCKER_OPTS="--debug  --bip=10.1.74.1/24 --mtu=1472"\n'


def test_missing_file_gives_empty_options(tmp_path):
    res, out = run(tmp_path, None)
    assert res.returncode == 0, res.stderr
    assert out == 'DOCKER_OPTS=""\n'


def test_the_file_is_read_not_executed(tmp_path):
    res, out = run(tmp_path, SAMPLE + f"touch {tmp_path}/pwned\n$(touch {tmp_path}/pwned)\n")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "pwned").exists()
    assert "--bip=10.1.74.1/24" in out


def test_subnet_already_routed_via_another_host_is_refused(tmp_path):
    res, out = run(tmp_path, SAMPLE, routes="10.1.74.0/24 via 192.0.2.9 dev eth0")
    assert res.returncode == 1
    assert "already contains the subnet: 10.1.74.0/24 via 192.0.2.9" in res.stderr
    assert "--bip=10.1.74.1/24" in out  # written first, like the reference


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        (SAMPLE + "FLANNEL_IPMASQ=maybe\n", (), "FLANNEL_IPMASQ"),
        (SAMPLE, ("-k", "BAD-KEY"), "-k BAD-KEY is not a valid variable name"),
        (SAMPLE, ("-h",), "usage:"),
        (SAMPLE, ("-x",), "usage:"),
        (SAMPLE, ("extra",), "usage:"),
    ],
)
def test_bad_input_is_refused(tmp_path, text, flags, message):
    res, _ = run(tmp_path, text, *flags)
    assert res.returncode == 1
    assert message in res.stderr


def test_defaults_are_flannels_paths():
    text = SCRIPT.read_text()
    assert "flannel_env=/run/flannel/subnet.env" in text
    assert "docker_env=/run/docker_opts.env" in text
    assert os.access(SCRIPT, os.X_OK)


# -- hostile subnet.env (issue 12, defect 8) ------------------------------------------------------
# Each value must be refused before anything is written or run: exit status non-zero, no output
# file, no marker file `pwned` (the script runs in tmp_path, so `touch pwned` would land there).

CRAFTED = {
    "FLANNEL_SUBNET": [
        "10.1.74.a[$(touch pwned)]/24",  # arithmetic on the last octet runs the subscript
        "10.1.74.a[`touch pwned`]/24",
        "a[$(touch pwned)]",
        "10.1.74.1/24 $(touch pwned)",
        '"10.1.74.1/24',  # the first line of a quoted value holding a newline
        '10.1.74.1/24"; touch pwned; "',
        "10.1.74.256/24",
        "10.1.74.1/33",
        "10.1.074.1/24",  # a leading zero: octal in shell arithmetic
        "10.1.74.1",
        "10.1.74.1/24/24",
        " 10.1.74.1/24",
        "-1.1.74.1/24",
    ],
    "FLANNEL_MTU": [
        "1450$(touch pwned)",
        "1450`touch pwned`",
        '1450"; touch pwned; "',
        "1450 1",
        "a[$(touch pwned)]",
        "0",
        "67",
        "65536",
        "01450",
        "0x5aa",
        "-1",
        "1e3",
    ],
    "FLANNEL_IPMASQ": ["true$(touch pwned)", "`touch pwned`", "maybe", "TRUE", "true false", "1"],
    "FLANNEL_NETWORK": ["10.1.0.0/16$(touch pwned)", "10.1.0.0", "10.1.0.0/16 x", "300.1.0.0/16"],
}
GOOD = {
    "FLANNEL_NETWORK": "10.1.0.0/16",
    "FLANNEL_SUBNET": "10.1.74.1/24",
    "FLANNEL_MTU": "1472",
    "FLANNEL_IPMASQ": "false",
}


def env_with(key: str, value: str) -> str:
    return "".join(f"{k}={value if k == key else v}\n" for k, v in GOOD.items())


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in CRAFTED.items() for v in values]
)
@pytest.mark.parametrize("flags", [(), ("-m",)], ids=["all", "no-ipmasq"])
def test_a_bad_field_is_refused_before_anything_is_written_or_run(tmp_path, key, value, flags):
    res, out = run(tmp_path, env_with(key, value), *flags)
    assert not (tmp_path / "pwned").exists()
    assert res.returncode != 0
    assert not (tmp_path / "docker_opts.env").exists() and out == ""
    assert not (tmp_path / "ip.calls").exists()  # not even the route check ran
    assert len(res.stderr.splitlines()) == 1 and key in res.stderr


def test_a_bad_field_leaves_an_earlier_output_file_alone(tmp_path):
    (tmp_path / "subnet.env").write_text(env_with("FLANNEL_MTU", "1450$(touch pwned)"))
    (tmp_path / "docker_opts.env").write_text("old\n")
    res = subprocess.run(
        ["bash", str(SCRIPT), "-f", "subnet.env", "-d", "docker_opts.env"],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
    )
    assert res.returncode != 0 and not (tmp_path / "pwned").exists()
    assert (tmp_path / "docker_opts.env").read_text() == "old\n"


@pytest.mark.parametrize(
    ("subnet", "mtu", "ipmasq"),
    [
        ("0.0.0.1/0", "68", "true"),
        ("255.255.255.255/32", "65535", "false"),
        ("192.168.100.1/22", "9000", "true"),
        ("10.244.7.129/25", "1450", "false"),
    ],
)
def test_valid_values_at_the_edges_give_the_same_output_as_before(tmp_path, subnet, mtu, ipmasq):
    text = f"FLANNEL_NETWORK=0.0.0.0/0\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU={mtu}\n"
    res, out = run(tmp_path, text + f"FLANNEL_IPMASQ={ipmasq}\n")
    assert res.returncode == 0, res.stderr
    docker_masq = "false" if ipmasq == "true" else "true"
    assert out == (
        f'DOCKER_OPT_BIP="--bip={subnet}"\n'
        f'DOCKER_OPT_IPMASQ="--ip-masq={docker_masq}"\n'
        f'DOCKER_OPT_MTU="--mtu={mtu}"\n'
        f'DOCKER_OPTS=" --bip={subnet} --ip-masq={docker_masq} --mtu={mtu}"\n'
    )


def test_the_last_line_is_read_without_a_newline(tmp_path):
    res, out = run(tmp_path, SAMPLE + "FLANNEL_IPMASQ=true", "-i")
    assert res.returncode == 0, res.stderr
    assert 'DOCKER_OPT_IPMASQ="--ip-masq=false"\n' in out
