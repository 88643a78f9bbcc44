"""Backend implementations. Imports point one way: nothing here imports the registry
(`omoe_kernels.backends`) or the package root.

- `limits`: the expert bounds and TRITON_INTERPRET, shared with the registry.
- `registration`: the op schema, checks, fake kernels and autograd shared by the op families.
- `compiled`: the `cpu` and `cuda` backends (the `omoe` ops of the `_C` extension).
- `triton/`: the `triton` backend.
"""
