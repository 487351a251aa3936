"""scripts/bench_memory.py (bench_train.py --memory): the planned-peak formula and the largest-batch
interpolation of its table (the compiles themselves are paper-sized and run only from the script)."""
import types

from scripts import bench_memory

GIB = 2 ** 30


def test_peak_counts_donated_buffers_once_and_prefers_the_larger_figure():
  stats = types.SimpleNamespace(argument_size_in_bytes=10, output_size_in_bytes=8, temp_size_in_bytes=100,
                                alias_size_in_bytes=8, peak_memory_in_bytes=10)
  assert bench_memory.peak_bytes(stats) == 110
  stats.peak_memory_in_bytes = 500
  assert bench_memory.peak_bytes(stats) == 500


def test_largest_batch_interpolates_between_and_extrapolates_beyond_the_measured_points():
  rows = [{'clips': 64, 'peak': 2 * GIB}, {'clips': 256, 'peak': 8 * GIB}, {'clips': 784, 'peak': 24.5 * GIB}]
  assert bench_memory.largest_batch(rows, 5 * GIB) == '160'
  assert bench_memory.largest_batch(rows, 1 * GIB) == '< 64'
  assert bench_memory.largest_batch(rows, 40 * GIB) == '≈ 1,280 (extrapolated)'
  flat = [{'clips': 64, 'peak': 2 * GIB}, {'clips': 784, 'peak': 2 * GIB}]
  assert bench_memory.largest_batch(flat, 24 * GIB) == '> 784'
  # Curvature (the N×N similarity matrix) is extrapolated quadratically, not along the last segment.
  quad = [{'clips': b, 'peak': GIB + 1e5 * b + 16 * b * b} for b in (64, 784, 8192)]
  assert bench_memory.largest_batch(quad, 24 * GIB) == '≈ 36,286 (extrapolated)'
