"""The `triton` backend: `launch` (layouts, launch plans, launchers, the
`torch.ops.omoe_triton` ops), `params` (the launchers' parameter records), `gemm_kernels`
and `token_kernels` (the kernels), `configs` (their launch configs and split rules)."""
