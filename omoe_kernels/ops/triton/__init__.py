"""The `triton` backend: `launch` (layouts, launchers, the `torch.ops.omoe_triton` ops),
`gemm_kernels` and `token_kernels` (the kernels), `configs` (their launch configs)."""
