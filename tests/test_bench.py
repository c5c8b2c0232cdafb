"""The benchmark runs end to end and reports what it claims (numbers are not asserted)."""

from __future__ import annotations

from server.testing.bench import run, table


async def test_bench_smoke() -> None:
    result = await run(calls=3, seconds=0.4, warmup=0.1)
    for direction in ("caller_to_model", "model_to_caller"):
        stats = result[direction]
        assert stats["frames_sent"] > 0
        assert stats["frames_lost"] == 0
        assert stats["samples"] > 0 and stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert result["bridge_cpu_us_per_relayed_frame"] is not None
    assert result["bridge_rss_peak_mib"] >= result["bridge_rss_idle_mib"] > 0
    assert result["setup_ms"]["max"] > 0
    text = table(result)
    assert "caller->model latency p50/p99/max" in text and "bridge RSS per call" in text
