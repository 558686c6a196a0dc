"""The model-level hooks moelora installs: plain functions that find the ``AdapterState``
through the module they are attached to (``module.moelora_state``), never a closure.

- top model, pre: take ``adapter_names`` out of the call (HF would pass it on), note labels;
- decoder stack, pre: build the forward's ``BatchPlan`` (which adapter each sequence uses) and
  reset the per-forward state (mask, KV-cache length, routing records), so every forward starts
  clean, also a direct call of the decoder stack; post (also on error): forget it again;
- top model, post: add each adapter's router load-balance loss to ``loss`` (also for
  ``return_dict=False`` tuples) and report ``aux_loss`` and ``aux_losses`` (per adapter);
- ``state_dict`` / ``load_state_dict`` pre-hooks: write back base weights a LoRA-Switch merge
  holds, so a state dict never contains a merged selection.
"""
from __future__ import annotations

import torch

from . import _private
from .layers.router import load_balance_loss, load_balance_terms
from .methods.lora_switch.layer import restore_switch_weights


def top_pre(module, args, kwargs):
    state = module.moelora_state
    names = kwargs.pop("adapter_names", None)
    state.pending_names = state.generation_names if names is None else names
    state.has_labels = kwargs.get("labels") is not None
    return args, kwargs


def stack_pre(module, args, kwargs):
    state = module.moelora_state
    names = kwargs.pop("adapter_names", None)
    if names is None:
        names = state.pending_names
    state.pending_names = None
    if state.disabled:
        return args, kwargs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    batch = None if ids is None else ids.shape[0]
    plan = state.resolve_names(names, batch, None if ids is None else ids.device)
    if state.merged_lora is not None and any(n != state.merged_lora for n in plan.names()):
        raise RuntimeError(f"adapter {state.merged_lora!r} is merged into the base weights (moelora.merge_lora); "
                           "call moelora.unmerge_lora(model) before running other adapters or the base")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    state.begin_forward(plan, mask if isinstance(mask, torch.Tensor) else None, _private.cached_tokens(kwargs))
    return args, kwargs


def stack_post(module, args, kwargs, output):
    module.moelora_state.end_forward()
    return output


def top_post(module, args, kwargs, output):
    state = module.moelora_state
    has_labels, state.has_labels = state.has_labels, False
    if torch.compiler.is_compiling() and not module.training:
        state.end_compiled_step()
    if state.disabled or not state.records or not (module.training or has_labels):
        if torch.is_grad_enabled():  # an eval forward with grad on: its records must not keep the graph
            state.detach_records()
        return output  # decode/eval without labels: no extra work on the hot path
    losses = {}
    for name, records in state.records.items():
        info = state.adapters.get(name)
        if info is None or not records:
            continue
        cfg = info.config
        # LoRA-Switch has one routed layer, so only MixLoRA offers the pooled form.
        losses[name] = cfg.router_aux_loss_coef * aux_loss_from_records(records, getattr(cfg, "aux_loss_pooling",
                                                                                         "layer_mean"))
    state.detach_records()  # the aux loss holds the graph now; records stay for router_statistics
    if not losses:
        return output
    aux = sum(losses.values())
    if isinstance(output, tuple):
        if has_labels and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            output = (output[0] + aux.to(output[0].dtype),) + tuple(output[1:])
        return output
    if getattr(output, "loss", None) is not None:
        output["loss"] = output.loss + aux.to(output.loss.dtype)
    output["aux_loss"] = aux
    output["aux_losses"] = losses
    return output


def aux_loss_from_records(records: dict, pooling: str = "layer_mean") -> torch.Tensor:
    """Load-balance loss (without coef) over the routed layers of one adapter in the last forward."""
    terms = [(load_balance_terms(r.routing, r.token_mask, r.num_experts), r.num_experts) for r in records.values()]
    if pooling == "pooled":
        counts = sum(t[0][0] for t in terms)
        probs = sum(t[0][1] for t in terms)
        n = sum(t[0][2] for t in terms)
        return load_balance_loss(counts, probs, n, terms[0][1])
    losses = [load_balance_loss(c, p, n, e) for (c, p, n), e in terms]
    return torch.stack(losses).mean()


def restore_before_state_dict(module, *args, **kwargs) -> None:
    restore_switch_weights(module.moelora_state)
