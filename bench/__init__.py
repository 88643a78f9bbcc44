"""Benchmarks of omoe_kernels (docs/contract.md §6): `python -m bench.bench_omoe`, `pytest bench/test_bench_ops.py`."""

import os

# The profiler (CPU peak memory, bench/memory.py) otherwise logs a GPU probe failure on
# CUDA builds; it reads this when torch starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
