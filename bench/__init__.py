"""Benchmarks of omoe_kernels (SPEC §6): `python -m bench.bench_omoe`, `pytest bench/test_bench_ops.py`."""
