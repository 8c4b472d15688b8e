"""Bounded memory: peak RSS grows at most a small constant times the extra data.

bench/bench_memory.py measures calibration (``quantize``) and analysis (``analyze``) in fresh
subprocesses at N and 10 N samples (numbers in BENCHMARKS.md: about 1.2x and 2.0x the extra
data). This test runs the same measurement smaller, with a generous bound: anything that
kept per-sample activations or copied the data several more times would exceed it.
"""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

#: peak RSS growth allowed per MiB of extra calibration data, plus a fixed slack.
RSS_PER_DATA_MIB = 3.0
SLACK_MIB = 64.0


def _bench():  # noqa: ANN202 - a module loaded from a path
    spec = importlib.util.spec_from_file_location("bench_memory",
                                                  REPO / "bench" / "bench_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_grows_linearly_and_modestly_with_the_data() -> None:
    rows = _bench().run(samples=500, factor=10, features=4096)  # 7.8 MiB -> 78 MiB
    assert [row["stage"] for row in rows] == ["calibration", "analysis"]
    for row in rows:
        assert row["data_growth_mib"] == 70.3
        assert row["small"]["peak_rss_mib"] > 50  # a real measurement, not zero
        bound = RSS_PER_DATA_MIB * row["data_growth_mib"] + SLACK_MIB
        assert row["rss_growth_mib"] <= bound, row
