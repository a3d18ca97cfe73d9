"""The benchmark's pure parts: statistics, the summary and its ratios, the tables, the
synthetic peer records, which labs the data-path run builds, and the command line."""

from __future__ import annotations

import re
from contextlib import ExitStack
from ipaddress import IPv4Network

import pytest

import backends
from deploy import benchmark as cli
from deploy.bench import datapath, report, scale, stats
from deploy.bench.measure import Journal
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


def cells(table: str, name: str) -> list[str]:
    """The cells of the table's row `name` (cells are 2 or more spaces apart; a name has 1)."""
    [row] = [
        re.split(r"\s{2,}", line.strip())
        for line in table.splitlines()
        if re.match(rf"  {re.escape(name)}\*?  ", line)
    ]
    return row


def test_ipv6_rows_take_their_ratios_to_the_ipv6_underlay():
    samples = [
        sample(1, "underlay", 10.0, 50.0),
        sample(1, "host-gw", 8.0, 60.0, join_ms=40.0),
        {"round": 1, "datapath": "underlay (IPv6)", "gbps_1": 16.0, "p50_us": 40.0},
        {"round": 1, "datapath": "host-gw (IPv6)", "gbps_1": 12.0, "p50_us": 60.0},
        {"round": 1, "datapath": "vxlan (IPv6)", "gbps_1": 4.0, "p50_us": 80.0},
    ]
    names = ["underlay", "host-gw", "underlay (IPv6)", "host-gw (IPv6)", "vxlan (IPv6)"]
    summary = stats.summarise(samples, names)
    assert summary["host-gw"]["gbps_1_ratio"] == pytest.approx(0.8)  # to the IPv4 underlay
    assert summary["underlay (IPv6)"]["gbps_1_ratio"] == 1
    v6 = summary["host-gw (IPv6)"]
    assert v6["gbps_1_ratio"] == pytest.approx(0.75) and v6["p50_us_ratio"] == 1.5
    assert v6["gbps_4"] is None and v6["gbps_4_ratio"] is None and v6["join_ms"] is None
    assert summary["vxlan (IPv6)"]["gbps_1_ratio"] == pytest.approx(0.25)
    assert [stats.underlay_of(n) for n in names] == ["underlay"] * 2 + ["underlay (IPv6)"] * 3

    table = report.render_table(summary, 1)
    underlay6 = ["underlay (IPv6)*", "16.00", "-", "1.00/-", "40"]
    assert cells(table, "underlay (IPv6)")[:5] == underlay6
    assert cells(table, "host-gw (IPv6)")[:7] == [
        "host-gw (IPv6)", "12.00", "-", "0.75/-", "60", "-", "1.50",
    ]  # fmt: skip
    assert cells(table, "host-gw")[3] == "0.80/0.80" and cells(table, "host-gw")[-1] == "40"
    assert "× underlay = to underlay (IPv6)" in table
    assert "(IPv6)" not in report.render_table(stats.summarise(samples[:2], names[:2]), 1)


@pytest.mark.parametrize(
    ("backends", "ipv6", "built"),
    [
        (["host-gw", "udp", "vxlan"], True, ["host-gw", "udp", "vxlan", "host-gw 6", "vxlan 6"]),
        (["host-gw", "udp", "vxlan"], False, ["host-gw", "udp", "vxlan"]),
        (["udp"], True, ["udp"]),
    ],
)
def test_dual_stack_labs_only_for_the_dual_stack_backends(monkeypatch, backends, ipv6, built):
    calls = []

    def build_lab(journal, stack, prefixes, backend, v6):
        calls.append(backend + " 6" * v6)  # and fails: nothing measured

    monkeypatch.setattr(datapath, "build_lab", build_lab)
    with ExitStack() as stack:
        out = datapath.run_rounds(Journal(), stack, iter(()), backends, 1, 1.0, 10, ipv6)
    assert calls == built and out == ([], [])


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
    assert s.ipv6 and s.document()["ipv6_network"] == "fd00:10:244::/56"
    no6 = cli.parse_args(["--no-ipv6"])
    assert not no6.ipv6 and no6.document()["ipv6"] is False
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


def test_scale_table_shows_the_time_after_the_last_write_and_the_cold_start():
    row = {
        "backend": "vxlan",
        "peers": 5000,
        "expected": {"route": 5000, "arp": 5000, "fdb": 5000},
        "counts": {},
        "converged": True,
        "write_s": 0.5,
        "seen_s": 0.9,
        "kernel_s": 1.5,
        "kernel_after_write_s": 1.0,
        "rss_before_mb": 55.0,
        "rss_after_mb": 70.0,
        "full_ms": 60.0,
        "noop_ms": 10.0,
        "one_more_ms": 70.0,
        "cold_ready_s": 1.25,
        "cold_kernel_s": 1.75,
        "removed_s": 0.6,
    }
    table = report.render_scale_table([row])
    line = next(line for line in table.splitlines() if line.strip().startswith("vxlan"))
    assert "1.50" in line and "1.00" in line and "1.25/1.75" in line
