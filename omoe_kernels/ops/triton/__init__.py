"""The `triton` backend: `launch` (launch plans, launchers, the `torch.ops.omoe_triton`
ops), `sizing` (layouts, dot kinds, the launch target), `params` (the launchers' parameter
records), `tuned` (launch records, autotuned configs chosen once), `replay` (plans
recorded once per call signature), `gemm_kernels` and `token_kernels` (the kernels),
`configs` (their launch configs and split rules)."""
