"""bench.lookup_cost's arithmetic: ratios are taken round by round against the same round's rtt,
and the README section shows every window's column and the derived costs."""

from __future__ import annotations

from typing import Any

from bench import lookup_cost as lc


class FakeBench:
    """Two rounds of every series lookup_cost records, with known values."""

    def __init__(self) -> None:
        rtt = [100.0, 200.0]
        self.series: dict[str, list[float]] = {"rtt": rtt}
        for nbytes in lc.ECHO_BYTES:
            self.series[f"echo/{nbytes}"] = [50.0 + (nbytes > 8192) * 10, 60.0]
        for w in lc.WINDOWS_US:
            self.series[f"ping/{w}"] = [110.0, 220.0]
            self.series[f"paced_ping/{w}"] = [120.0, 240.0]
            for n in lc.NUM_HASHES:
                # 1 us per hash over the ping, and 20 us more past one write batch (> 250 hashes)
                self.series[f"lookup{n}/{w}"] = [110.0 + n + (n > 250) * 20, 220.0 + n]
        # The same requests from a bare DEALER: 30 us (ping) and 50 us (lookup) less client code.
        self.series["raw_ping"] = [80.0, 190.0]
        self.series[f"raw_lookup{lc.BARE_HASHES}"] = [336.0, 426.0]
        # The same LOOKUP inline instead of by hash file: 12 us more.
        self.series[f"raw_lookup{lc.BARE_HASHES}_inline"] = [348.0, 438.0]
        self.cpu = {w: [lc.CLOCK_TICKS, 1000] for w in lc.WINDOWS_US}  # 1 s over 1000 calls
        self.paced_cpu = {w: [lc.CLOCK_TICKS, 2000] for w in lc.WINDOWS_US}


def results() -> dict[str, Any]:
    return lc.results(FakeBench(), 2, "python -m bench.lookup_cost", 1.0)  # type: ignore[arg-type]


def test_ratios_are_per_round_against_that_rounds_rtt() -> None:
    res = results()
    w = lc.DEFAULT_BUSY_POLL_US
    # Round 1: 386 / 100; round 2: 476 / 200; the median of the two.
    assert res["ratios"][f"lookup256/{w}_vs_rtt"] == round((3.86 + 2.38) / 2, 3)
    assert res["series"]["rtt"]["median_us"] == 150.0
    assert "rtt_vs_rtt" not in res["ratios"]


def test_derived_costs_come_from_the_default_window() -> None:
    d = results()["derived"]
    assert d["echo_step_us_8000_to_8300"] == 5.0  # medians 55 and 60
    # lookup256 (median of 386 and 476 = 431) - lookup250 (median of 360 and 470 = 415)
    assert d["lookup_step_us_250_to_256"] == 16.0
    assert d["lookup_us_per_hash_1_to_250"] == 1.0
    assert d["lookup1_minus_ping_us"] == 1.0
    assert d["client_us_ping"] == 30.0  # ping 165 - raw_ping 135 (medians)
    assert d[f"client_us_lookup{lc.BARE_HASHES}"] == 50.0  # 431 - 381
    assert d[f"file_saves_us_lookup{lc.BARE_HASHES}"] == 12.0  # 393 - 381
    assert d["daemon_cpu_us_per_lookup_release"][str(lc.DEFAULT_BUSY_POLL_US)] == 1000.0
    assert d["daemon_cpu_us_per_paced_ping"][str(lc.DEFAULT_BUSY_POLL_US)] == 500.0


def test_render_has_a_column_per_window_and_marks_the_default() -> None:
    text = lc.render(results())
    header = next(line for line in text.splitlines() if line.startswith("| request"))
    assert header.count("busy-poll") + header.count("no busy poll") == len(lc.WINDOWS_US)
    assert f"busy-poll {lc.DEFAULT_BUSY_POLL_US} us (default)" in header
    rows = [line for line in text.splitlines() if line.startswith("| lookup")]
    assert len(rows) == len(lc.NUM_HASHES)
    assert "the Client's Python costs 30 us of a PING and 50 us of that LOOKUP" in text
    assert "inline (the file saves 12 us)" in text
