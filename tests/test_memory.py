"""Bounded memory: peak RSS does not grow with the number of calibration samples.

bench/bench_memory.py measures calibration (``quantize``) and analysis (``analyze``) in fresh
subprocesses at N and 10 N samples (numbers in BENCHMARKS.md: flat within a few MiB at
2,000 -> 20,000 samples, 31 -> 312 MiB of data). This test runs the same measurement
smaller, with a fixed bound well below the extra data: anything that held the whole
calibration set (one copy is +70 MiB here) fails it, whatever the copy is for.

The bench runs as its own process: Linux starts a child's peak RSS at its parent's, so
measuring from inside pytest (hundreds of MiB after other tests) would hide any growth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

#: peak RSS growth allowed when the data grows from 7.8 MiB to 78 MiB (500 -> 5,000 samples).
MAX_GROWTH_MIB = 48.0


@pytest.mark.parametrize(("options", "stages"), [
    ((), ["calibration", "analysis"]),
    # deflated members go through a temporary file, the same code for both stages
    (("--compressed", "--stages", "calibration"), ["calibration"]),
], ids=["stored", "compressed"])
def test_peak_rss_does_not_grow_with_the_data(tmp_path: Path, options: tuple[str, ...],
                                              stages: list[str]) -> None:
    out = tmp_path / "rows.json"
    command = [sys.executable, str(REPO / "bench" / "bench_memory.py"), "--samples", "500",
               "--factor", "10", "--features", "4096", "--json", str(out), *options]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    assert [row["stage"] for row in rows] == stages
    for row in rows:
        assert row["data_growth_mib"] == 70.3
        assert row["small"]["peak_rss_mib"] > 50  # a real measurement, not zero
        assert row["rss_growth_mib"] <= MAX_GROWTH_MIB, row
