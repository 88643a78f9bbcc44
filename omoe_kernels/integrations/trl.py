"""TRL's preference trainers on a model with OMoE adapters, the base model as the reference.

    from omoe_kernels.integrations.trl import OMoEDPOTrainer, OMoEGRPOTrainer

With a peft model TRL computes the reference log-probs by disabling the adapter; with any
other model it loads a second copy of the model from `config._name_or_path`. These
subclasses give an OMoE model the peft behaviour: the reference is the same model inside
`ok.disable_adapters`, which computes exactly the base model, so no second model and no
extra parameter exist.

- DPO: the reference log-probs are precomputed once, before training, through TRL's
  `precompute_ref_log_probs=True` path, with `compute_ref_log_probs` run inside
  `disable_adapters` (`reference="base"`), or with the adapters as they are when the
  trainer is built (`reference="initial"`: DPO after an SFT of the same adapters, the SFT
  policy as the reference, as TRL's peft path does with its "ref" adapter copy). TRL's per-step reference path (`precompute_ref_log_probs=False`)
  calls a separate reference model and so cannot run without a copy: it is refused.
- GRPO: with `beta > 0` the reference log-probs of each generated batch are computed inside
  `disable_adapters`; `trainer.ref_model` is a marker holding no parameters.
- SFT needs no reference: `trl.SFTTrainer` runs on an OMoE model as it is.

Supported TRL versions: the Makefile's pin (the subclasses use `compute_ref_log_probs` and
`_get_per_token_logps_and_entropies`, which TRL may change between minor versions).
"""
from __future__ import annotations

import trl
from torch import nn

from ..adapters import disable_adapters, omoe_layers

REFERENCES = ("base", "initial")

__all__ = ["BaseModelReference", "OMoEDPOTrainer", "OMoEGRPOTrainer", "check_policy"]


def check_policy(model: nn.Module, trainer: str) -> None:
    """Raise unless `model` holds OMoE adapters and is no peft model (whose adapters TRL
    disables itself)."""
    if hasattr(model, "peft_config"):
        raise ValueError(f"{trainer}: `model` is a peft model; TRL already uses its base model as "
                         f"the reference. Use trl.{trainer.removeprefix('OMoE')} directly.")
    if not omoe_layers(model):
        raise ValueError(f"{trainer}: `model` holds no OMoE adapter, so its base model is no "
                         "reference distinct from the policy: call omoe_kernels.inject first.")


def _refuse_copy_options(trainer: str, ref_model, kwargs: dict, args) -> None:
    if ref_model is not None:
        raise ValueError(
            f"{trainer} uses the base model (the model inside omoe_kernels.disable_adapters) as "
            f"the reference and keeps no reference model: omit `ref_model`, or use "
            f"trl.{trainer.removeprefix('OMoE')} to train against a separate reference model.")
    if kwargs.get("peft_config") is not None:
        raise ValueError(f"{trainer}: `peft_config` would wrap the OMoE model in peft; train "
                         "either OMoE adapters (this trainer) or a peft adapter (the TRL trainer).")
    if args is not None and getattr(args, "sync_ref_model", False):
        raise ValueError(f"{trainer}: `sync_ref_model=True` updates a separate reference model, "
                         "which this trainer does not keep: set `sync_ref_model=False`.")
    if args is not None and getattr(args, "fsdp", None):
        raise ValueError(f"{trainer}: under FSDP TRL loads a reference model to precompute the "
                         "reference log-probs; use trl's trainer with an explicit `ref_model`.")


class OMoEDPOTrainer(trl.DPOTrainer):
    """`trl.DPOTrainer` with the base model of an OMoE model as the reference, no copy.

    Needs `DPOConfig(precompute_ref_log_probs=True)` (the default when `args` is None): the
    reference log-probs of the train and eval sets are computed once, before training, with
    the adapters disabled. An eval set passed to `evaluate()` after training has started
    must have been given at construction (TRL's rule for a precomputed reference).
    `reference`: "base" (the model with its OMoE adapters disabled) or "initial" (the
    model as it is at construction, adapters on)."""

    def __init__(self, model, ref_model=None, args=None, *pos, reference: str = "base", **kwargs):
        name = type(self).__name__
        if reference not in REFERENCES:
            raise ValueError(f"{name}: `reference` must be one of {REFERENCES}, got {reference!r}")
        self.omoe_reference = reference
        check_policy(model, name)
        _refuse_copy_options(name, ref_model, kwargs, args)
        if args is None:
            args = trl.DPOConfig(output_dir=f"{type(model).__name__}-DPO",
                                 precompute_ref_log_probs=True)
        if not args.precompute_ref_log_probs:
            raise ValueError(
                f"{name} needs DPOConfig(precompute_ref_log_probs=True): TRL's per-step "
                "reference path calls a separate reference model, which it would load as a "
                "second copy of the model. With precompute the reference log-probs are "
                "computed once with the OMoE adapters disabled, and no copy exists.")
        super().__init__(model, None, args, *pos, **kwargs)
        if self.ref_model is not None:
            raise RuntimeError(f"{name}: TRL built a reference model; this TRL version is outside "
                               "the supported range (the Makefile's pin)")

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches the reference log-probs under (dataset, model hash); the model hash is
        # the same for either reference, and for TRL's own precompute of the policy, so
        # the key also names the reference.
        tag = f"-omoe-reference-{self.omoe_reference}"
        if not str(self._precompute_model_hash).endswith(tag):
            self._precompute_model_hash = f"{self._precompute_model_hash}{tag}"
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        if self.omoe_reference == "initial":
            return super().compute_ref_log_probs(model, inputs)
        with disable_adapters(self.accelerator.unwrap_model(self.model)):
            return super().compute_ref_log_probs(model, inputs)


class BaseModelReference:
    """Stands in `OMoEGRPOTrainer.ref_model`: the policy with its OMoE adapters disabled.
    Holds no module and no parameter; only the trainer's log-prob method reads it."""

    def __repr__(self) -> str:
        return "BaseModelReference(the policy inside omoe_kernels.disable_adapters)"


class OMoEGRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose KL reference (`beta > 0`) is the base model of the OMoE
    policy, computed inside `ok.disable_adapters`; no reference copy is loaded."""

    def __init__(self, model, reward_funcs, args=None, *pos, **kwargs):
        name = type(self).__name__
        check_policy(model, name)
        adapter = {id(getattr(layer, t)) for layer in omoe_layers(model).values()
                   for t in ("lora_A", "lora_B", "router_weight")}
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter]
        if others:
            raise ValueError(
                f"{name}: parameters outside the OMoE adapters are trainable ({others[:3]}...), "
                "and disable_adapters does not undo their training, so the base would drift from "
                "the reference: freeze them (`requires_grad_(False)`) or drop modules_to_save.")
        _refuse_copy_options(name, kwargs.pop("ref_model", None), kwargs, args)
        if args is None:
            args = trl.GRPOConfig(output_dir=f"{type(model).__name__}-GRPO")
        beta = args.beta
        # TRL loads a reference copy for any non-peft model when beta != 0; build with
        # beta = 0 (no reference) and restore it, the reference then being the marker.
        args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *pos, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        self.ref_model = BaseModelReference() if beta != 0.0 else None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if isinstance(model, BaseModelReference):
            with disable_adapters(self.accelerator.unwrap_model(self.model)):
                return super()._get_per_token_logps_and_entropies(self.model, *args, **kwargs)
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
