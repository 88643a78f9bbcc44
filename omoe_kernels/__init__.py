"""omoe_kernels: fused kernels for OMoE, the orthogonal mixture of LoRA experts.

    import omoe_kernels as ok
    y = ok.omoe_lora(x, A, B, router_weight, top_k=2)
    layer = ok.OMoELinear(nn.Linear(4096, 4096), num_experts=4, rank=16)
    ok.inject(model, ok.OMoEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=8))
"""
from . import adapters
from .adapters import (
    OMoEConfig,
    active_adapter,
    adapter_batch,
    adapter_names,
    adapter_state_dict,
    adapters_enabled,
    disable_adapter,
    disable_adapters,
    enable_adapters,
    from_pretrained,
    inject,
    load_adapter,
    load_balancing_loss,
    mark_trainable,
    omoe_layers,
    print_trainable_parameters,
    read_adapter_config,
    remove,
    router_stats,
    save_adapter,
    save_pretrained,
    set_adapter,
    track_router_stats,
)
from .backends import BACKENDS, available_backends
from .functional import omoe_lora
from .layer import OMoELinear
from .mixed import omoe_lora_mixed
from .router_stats import RouterStats

__version__ = "0.1.0"
__all__ = ["BACKENDS", "OMoEConfig", "OMoELinear", "RouterStats", "active_adapter",
           "adapter_batch", "adapter_names", "adapter_state_dict", "adapters", "adapters_enabled",
           "available_backends", "disable_adapter", "disable_adapters", "enable_adapters", "from_pretrained",
           "inject", "load_adapter", "load_balancing_loss", "mark_trainable", "omoe_layers",
           "omoe_lora", "omoe_lora_mixed", "print_trainable_parameters", "read_adapter_config", "remove",
           "router_stats", "save_adapter", "save_pretrained", "set_adapter",
           "track_router_stats"]
