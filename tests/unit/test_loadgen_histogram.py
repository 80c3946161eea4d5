"""The C++ load generators' latency histogram (bench/loadgen/report.h), compiled on its own: it
needs no gRPC, only a C++ compiler, and is skipped without one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LOADGEN = Path(__file__).resolve().parents[2] / "bench" / "loadgen"

PROGRAM = r"""
#include "report.h"
#include <cstdio>
int main() {
  loadgen::Histogram h;
  h.Add(100);
  h.Add(int64_t{1} << 40);        // 12.7 days: clamped
  h.Add((int64_t{1} << 41) - 1);  // the old clamp, whose buckets were past the end
  h.Add(int64_t{1} << 50);
  std::printf("%.3f %.0f %llu\n", h.QuantileMs(0.0), h.MaxMs(),
              static_cast<unsigned long long>(h.total()));
  return 0;
}
"""


def test_latencies_past_the_last_bucket_are_clamped_inside_the_histogram(tmp_path: Path) -> None:
    """Values were clamped to 2**41 - 1 us, whose buckets lie past the end of the counts: a
    write out of bounds (caught here by libstdc++'s checked operator[])."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source, binary = tmp_path / "histogram.cc", tmp_path / "histogram"
    source.write_text(PROGRAM)
    subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-D_GLIBCXX_ASSERTIONS",
            f"-I{LOADGEN}",
            str(source),
            "-o",
            str(binary),
        ],
        check=True,
        timeout=300,
    )
    done = subprocess.run([str(binary)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    low, most, total = done.stdout.split()
    assert (low, total) == ("0.100", "4")
    assert float(most) == pytest.approx(((1 << 40) - 1) / 1000)
