"""What the test suite and the benchmarks share: the contract's shapes and tolerances."""
