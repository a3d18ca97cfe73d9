"""The benchmark's pure parts: statistics, the summary and its ratios, the tables, the
synthetic peer records, which labs the data-path run builds, and the command line."""

from __future__ import annotations

import re
from contextlib import ExitStack
from ipaddress import IPv4Network

import pytest

import backends
from deploy import benchmark as cli
from deploy.bench import datapath, pings, report, scale, stats
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
    # every backend, and udp also with its kernel fast path off, beside it
    assert s.backends == [*backends.known_backends(), "udp-userspace"] and s.rounds >= 3
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


PING_OUTPUT = """PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.
64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.452 ms
64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=1.23 ms
64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=1.50 ms (DUP!)
From 10.244.1.1 icmp_seq=3 Destination Host Unreachable
64 bytes from 10.244.2.2: icmp_seq=5 ttl=62 time=12 ms

--- 10.244.2.2 ping statistics ---
5 packets transmitted, 3 received, +1 duplicates, 40% packet loss, time 4004ms
rtt min/avg/max/mdev = 0.452/4.56/12.0/5.3 ms
"""


def test_ping_output_gives_the_answers_rtts_without_duplicates_or_errors():
    assert pings.parse_ping(PING_OUTPUT) == pytest.approx([452.0, 1230.0, 12000.0])
    assert pings.parse_ping("PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n") == []


def test_ping_summary_has_p50_and_p99_per_interval_answered():
    rtts = {0.2: [float(v) for v in range(1, 101)], 0.02: [], 0.002: [50.0]}
    out = pings.ping_summary(rtts)
    assert out == {
        "ping_0.2_p50_us": pytest.approx(50.5),
        "ping_0.2_p99_us": pytest.approx(99.01),
        "ping_0.002_p50_us": 50.0,
        "ping_0.002_p99_us": 50.0,
    }


def test_ping_rows_take_medians_and_ratios_to_the_underlay_and_an_idle_cpu():
    samples = [
        {"round": 1, "datapath": "underlay", "ping_0.2_p50_us": 70.0, "ping_0.2_p99_us": 90.0},
        {"round": 2, "datapath": "underlay", "ping_0.2_p50_us": 50.0, "ping_0.002_p50_us": 10.0},
        {"round": 1, "datapath": "udp", "ping_0.2_p50_us": 300.0, "idle_cpu_pct": 0.1},
        {"round": 2, "datapath": "udp", "ping_0.2_p50_us": 200.0, "idle_cpu_pct": 0.3},
        {"round": 1, "datapath": "vxlan", "p50_us": 90.0},  # no pings (e.g. --pings 0,0,0)
    ]
    summary = stats.summarise(samples, ["underlay", "udp", "vxlan"])
    udp = summary["udp"]
    assert udp["ping_0.2_p50_us"] == 250.0 and udp["ping_0.2_p50_us_ratio"] == 250.0 / 60
    assert udp["ping_0.002_p50_us"] is None and udp["ping_0.002_p50_us_ratio"] is None
    assert udp["idle_cpu_pct"] == pytest.approx(0.2)
    table = report.render_ping_table(summary, 2)
    assert cells(table, "underlay")[:3] == ["underlay*", "60/90", "1.0"]
    assert cells(table, "udp") == ["udp", "250/-", "4.2", "-/-", "-", "-/-", "-", "0.20"]
    assert not any(line.startswith("  vxlan") for line in table.splitlines())
    assert report.render_ping_table(stats.summarise(samples[4:], ["vxlan"]), 1) == ""


def test_pings_run_at_each_interval_with_a_count_and_a_failure_is_journaled(monkeypatch):
    calls = []

    def ping_rtts(lab, src, dst, interval, count):
        calls.append((interval, count))
        if interval == 0.02:
            raise datapath.BenchError("ping -i 0.02 got no answer")
        return [100.0, 300.0]

    monkeypatch.setattr(datapath, "ping_rtts", ping_rtts)
    pair = datapath.Pair("udp", None, "c1", "c2", "10.244.2.2", None)  # type: ignore[arg-type]
    journal, sample = Journal(), {}
    datapath.measure_pings(journal, pair, sample, "[round 1/1]", [5, 7, 0])
    assert calls == [(0.2, 5), (0.02, 7)]  # a count of 0 skips its interval
    assert journal.errors == ["[round 1/1] udp ping -i 0.02: ping -i 0.02 got no answer"]
    assert sample == {
        "ping_0.2_p50_us": 200.0,
        "ping_0.2_p99_us": pytest.approx(298.0),
        "ping_us": {"0.2": [100.0, 300.0]},
    }


def test_idle_cpu_is_the_mean_of_a_backends_two_agents_measured_in_one_window(monkeypatch):
    class FakeLab:
        def __init__(self, backend, pids):
            self.backend, self._pids = backend, pids

        def pair(self):
            return datapath.Pair(self.backend, None, "a", "b", "ip", self._pids)

    windows = []

    def idle_cpu_pct(pids, seconds):
        windows.append((list(pids), seconds))
        return [0.1, 0.3, 2.0, 4.0]

    monkeypatch.setattr(datapath, "idle_cpu_pct", idle_cpu_pct)
    labs = [FakeLab("host-gw", (11, 12)), FakeLab("udp", (21, 22))]
    out = datapath.measure_idle(Journal(), "[round 1/1]", labs, 10.0)  # type: ignore[arg-type]
    assert windows == [([11, 12, 21, 22], 10.0)]
    assert out == {"host-gw": pytest.approx(0.2), "udp": 3.0}


def test_ping_counts_and_idle_window_on_the_command_line(capsys):
    s = cli.parse_args([])
    assert s.pings == [50, 200, 1000] and s.idle == 10.0
    assert s.document()["ping_intervals"] == [0.2, 0.02, 0.002]
    s = cli.parse_args(["--pings", "5,0,10", "--idle", "0"])
    assert s.pings == [5, 0, 10] and s.idle == 0 and s.document()["ping_counts"] == [5, 0, 10]
    for bad in (["--pings", "5,5"], ["--pings", "a,b,c"], ["--pings", "1,-1,1"], ["--idle", "-1"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)
    assert "one per send interval 0.2, 0.02, 0.002 s" in capsys.readouterr().err


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
