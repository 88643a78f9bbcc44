"""Backend implementations: `compiled` (the omoe C++/CUDA ops) and `triton_omoe`."""
