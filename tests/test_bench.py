"""The benchmark runs end to end and reports what it claims (numbers are not asserted: frames
lost, latencies and ratios belong in the bench's output, not in the unit suite)."""

from __future__ import annotations

import argparse

import pytest

from server.testing.bench import BARE, BRIDGE, _comparison, configs, run, table
from server.testing.loadgen import Histogram


async def test_bench_smoke_compares_the_two_model_apis() -> None:
    lines: list[str] = []
    report = await run(calls=3, seconds=0.4, rounds=1, warmup=0.1, echo=lines.append,
                       compare=_comparison("MODEL_API=realtime,live"))
    realtime, live = "bridge MODEL_API=realtime", "bridge MODEL_API=live"
    assert report["order"] == [realtime, live, "bare relay"]
    assert len(lines) == 3  # one progress line per run
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    for label in report["order"]:
        summary = report["configs"][label]["summary"]
        assert summary["runs"] == 1 and summary["calls"] == 3
        for direction in ("caller_to_model", "model_to_caller"):
            stats = summary[direction]
            assert stats["frames_sent"] > 0 and stats["samples"] > 0
            assert stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        assert summary["rss_peak_mib"] >= summary["rss_idle_mib"] > 0
        assert summary["setup_ms"]["max"] > 0
        assert summary["load_generator"]["processes"] == 2
        assert "cpu_us_per_relayed_frame" in summary
        assert summary["errors"] == {}  # every session of either API started and streamed
    # Realtime marks its replies as they play; GPT-Live's continuous output only on demand
    assert report["configs"][realtime]["summary"]["marks_echoed_per_second"] > 0
    assert report["configs"][live]["summary"]["marks_echoed_per_second"] == 0
    assert report["configs"][live]["env"] == {"MODEL_API": "live"}
    assert report["ratios"][live]["vs"] == "bare relay"
    text = table(report)
    for row in ("machine: ", "caller->model latency p50/p99/max", "RSS per call",
                "load generator CPU, busiest process", "caller clock lateness",
                f"{realtime} CPU per relayed frame: ", f"{live} CPU per relayed frame: "):
        assert row in text


def test_compare_runs_two_bridges_beside_the_bare_relay() -> None:
    order = configs({"LOG_LEVEL": "ERROR"}, _comparison("RECORD_CALLS=off,on"))
    assert [(c.label, c.module) for c in order] == [
        ("bridge RECORD_CALLS=off", BRIDGE), ("bridge RECORD_CALLS=on", BRIDGE),
        ("bare relay", BARE)]
    assert order[1].env == {"LOG_LEVEL": "ERROR", "RECORD_CALLS": "on"}
    assert order[2].env == {}  # the baseline never gets the bridge's settings
    with pytest.raises(argparse.ArgumentTypeError):
        _comparison("RECORD_CALLS=on")


def test_histogram_percentiles_merge_across_processes() -> None:
    a, b = Histogram(), Histogram()
    for ms in range(1, 51):
        a.add(ms / 10)  # 0.1 .. 5.0 ms
    for ms in range(51, 101):
        b.add(ms / 10)  # 5.1 .. 10.0 ms
    merged = Histogram.merged([Histogram.from_json(a.to_json()), b])
    assert merged.count == 100 and merged.max_ms == 10.0
    assert merged.percentile(0.5) == pytest.approx(5.0, abs=0.02)
    assert merged.percentile(0.99) == pytest.approx(9.9, abs=0.02)
    assert Histogram().percentile(0.5) is None
