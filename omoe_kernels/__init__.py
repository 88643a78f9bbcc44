"""omoe_kernels: fused kernels for OMoE, the orthogonal mixture of LoRA experts.

    import omoe_kernels as ok
    y = ok.omoe_lora(x, A, B, router_weight, top_k=2)
    layer = ok.OMoELinear(nn.Linear(4096, 4096), num_experts=4, rank=16)
"""
from .backends import BACKENDS, available_backends
from .functional import omoe_lora
from .layer import OMoELinear

__all__ = ["BACKENDS", "OMoELinear", "available_backends", "omoe_lora"]
__version__ = "0.1.0"
from .inject import (adapter_state_dict, inject, load_adapter, load_balancing_loss, omoe_layers,
                     print_trainable_parameters, remove, router_stats, save_adapter,
                     track_router_stats)
from .layer import RouterStats

__all__ += ["RouterStats", "adapter_state_dict", "inject", "load_adapter", "load_balancing_loss",
            "omoe_layers",
            "print_trainable_parameters", "remove", "router_stats", "save_adapter",
            "track_router_stats"]
