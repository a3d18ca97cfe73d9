"""The benchmark's pure parts: statistics, the summary and its ratios, the tables, the
synthetic peer records and the command line."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

import backends
from deploy import benchmark as cli
from deploy.bench import report, scale, stats
from deploy.cluster import PREFIX
from flanneld.core.lease import LeaseAttrs
from flanneld.core.subnets import parse_subnet_key


def test_percentile_interpolates_between_ranks():
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile([7.0], 99) == 7.0


def sample(rnd: int, dp: str, gbps: float | None, p50: float, **extra: float) -> dict:
    return {"round": rnd, "datapath": dp, "gbps_1": gbps, "gbps_4": gbps, "p50_us": p50, **extra}


def test_summary_takes_medians_and_ratios_to_the_underlay():
    samples = [
        sample(1, "underlay", 10.0, 50.0),
        sample(2, "underlay", 12.0, 60.0),
        sample(3, "underlay", 20.0, 70.0),
        sample(1, "vxlan", 6.0, 80.0, join_ms=50.0),
        sample(2, "vxlan", None, 90.0, join_ms=70.0),  # a failed iperf3 run counts not
        sample(3, "vxlan", 9.0, 100.0, join_ms=60.0),
    ]
    summary = stats.summarise(samples, ["underlay", "vxlan"])
    assert summary["underlay"]["gbps_1"] == 12.0 and summary["underlay"]["gbps_1_ratio"] == 1
    vx = summary["vxlan"]
    assert vx["gbps_1"] == 7.5 and vx["gbps_1_ratio"] == pytest.approx(7.5 / 12)
    assert vx["p50_us_ratio"] == pytest.approx(1.5) and vx["join_ms"] == 60.0
    assert vx["cpu_src_pct_1"] is None and vx["rounds"] == 3
    table = report.render_table(summary, 3)
    assert "underlay*" in table and "medians of 3 interleaved round(s)" in table
    [row] = [line.split() for line in table.splitlines() if line.startswith("  vxlan")]
    assert row[1:5] == ["7.50", "7.50", "0.62/0.62", "90"]


def test_summary_without_underlay_has_no_ratios():
    summary = stats.summarise([sample(1, "udp", 1.0, 100.0)], ["udp"])
    assert summary["udp"]["gbps_1_ratio"] is None


@pytest.mark.parametrize("backend", ["host-gw", "vxlan", "udp"])
def test_synthetic_leases_are_real_records_skipping_our_subnet(backend):
    own = IPv4Network("10.1.1.0/24")
    leases = scale.synthetic_leases(backend, 300, own)
    assert len(leases) == 300
    subnets, ips, macs = set(), set(), set()
    for key, attrs in leases:
        subnet = parse_subnet_key(key.removeprefix(f"{PREFIX}/subnets/"))
        assert subnet is not None and subnet.subnet_of(IPv4Network(scale.SCALE_NETWORK))
        assert LeaseAttrs.decode(attrs.encode()) == attrs and attrs.public_ip in scale.PEER_IPS
        subnets.add(subnet)
        ips.add(attrs.public_ip)
        if backend == "vxlan":
            mac = attrs.backend_data["VtepMAC"]
            assert int(mac[:2], 16) & 0b11 == 0b10  # unicast, locally administered
            macs.add(mac)
    assert own not in subnets and len(subnets) == len(ips) == 300
    assert len(macs) == (300 if backend == "vxlan" else 0)
    assert (
        scale.expected_entries(backend, 300)
        == {
            "host-gw": {"route": 300},
            "vxlan": {"route": 300, "fdb": 300, "arp": 300},
            "udp": {},
        }[backend]
    )


def test_command_line_defaults_and_errors(capsys):
    s = cli.parse_args([])
    assert s.backends == backends.known_backends() and s.rounds >= 3
    assert s.scale == [1000, 5000] and not s.scale_only
    assert cli.parse_args(["--scale", "0"]).scale == []
    assert cli.parse_args(["--backends", "VXLAN", "--scale", "50,100"]).backends == ["vxlan"]
    for bad in (
        ["--backends", "gre"],
        ["--rounds", "0"],
        ["--scale", "0", "--scale-only"],
        ["--scale", "x"],
        ["--prefix", "Bad"],
    ):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    assert "--backends: unknown gre" in capsys.readouterr().err
