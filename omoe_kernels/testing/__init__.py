"""What the test suite and the benchmarks share: the contract's shapes and tolerances
(`shapes`), the per-token algebra in float64 (`oracle`), and the reference forward as a
function to compile (`reference`)."""
