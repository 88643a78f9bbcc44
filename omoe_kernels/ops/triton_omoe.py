"""Triton backend (issue 3): not built yet."""
AVAILABLE = False


def omoe_lora_triton(*args, **kwargs):
    raise NotImplementedError("the triton backend is not built yet")
