"""Adapters in a user's model, peft-style: `OMoEConfig`, `inject`, named adapters,
batches of several adapters, adapter files and directories (docs/integration.md)."""
from .config import OMoEConfig
from .files import (
                    ADAPTER_FORMAT,
                    ADAPTER_FORMAT_VERSION,
                    adapter_state_dict,
                    from_pretrained,
                    load_adapter,
                    read_adapter_config,
                    save_adapter,
                    save_pretrained,
)
from .model import (
                    active_adapter,
                    adapter_batch,
                    adapter_layers,
                    adapter_names,
                    adapters_enabled,
                    disable_adapter,
    disable_adapters,
                    enable_adapters,
                    inject,
                    load_balancing_loss,
                    mark_trainable,
                    omoe_layers,
                    print_trainable_parameters,
                    remove,
                    router_stats,
                    set_adapter,
                    track_router_stats,
                    trainable_parameters,
                    trainable_parameters_summary,
)

__all__ = ["ADAPTER_FORMAT", "ADAPTER_FORMAT_VERSION", "OMoEConfig", "active_adapter",
           "adapter_batch", "adapter_layers", "adapter_names", "adapter_state_dict", "adapters_enabled",
           "disable_adapter", "disable_adapters", "enable_adapters", "from_pretrained", "inject", "load_adapter",
           "load_balancing_loss", "mark_trainable", "omoe_layers", "print_trainable_parameters",
           "read_adapter_config", "remove", "router_stats", "save_adapter", "save_pretrained",
           "set_adapter", "track_router_stats", "trainable_parameters",
           "trainable_parameters_summary"]
