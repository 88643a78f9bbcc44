"""Developer tools, each a command: `python -m omoe_kernels.tools.<name>`.

- `profile`: one OMoELinear layer, stage by stage.
- `kernel_report`: the Triton kernels compiled ahead of time (SASS counts) and their model.
- `kernel_model`: the FLOP, byte and latency model that kernel_report prints.
- `launch_count`: the kernel launches of one training step.

The package itself never imports these.
"""
