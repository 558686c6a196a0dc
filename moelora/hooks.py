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
from .layers.router import Routing, load_balance_loss, load_balance_terms
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
    stacked = _stacked_terms(list(records.values()))
    if stacked is not None:  # every layer at once: ~20 launches per adapter, not ~20 per layer
        (counts, probs, n), e = stacked  # (L, E), (L, E), ()
        if pooling == "pooled":
            return load_balance_loss(counts.sum(0), probs.sum(0), n * counts.shape[0], e)
        return load_balance_loss(counts, probs, n, e).mean()  # (L,) per-layer losses
    terms = [(load_balance_terms(r.routing, r.token_mask, r.num_experts), r.num_experts) for r in records.values()]
    if pooling == "pooled":
        counts = sum(t[0][0] for t in terms)
        probs = sum(t[0][1] for t in terms)
        n = sum(t[0][2] for t in terms)
        return load_balance_loss(counts, probs, n, terms[0][1])
    losses = [load_balance_loss(c, p, n, e) for (c, p, n), e in terms]
    return torch.stack(losses).mean()


def _stacked_terms(recs: list):
    """``load_balance_terms`` of every layer in one batched computation, as ((L, E) routed counts,
    (L, E) prob sums, n_tokens) and E, when the layers agree in what the terms depend on (one token
    mask: per forward ``AdapterState.token_mask_for`` makes one, and a mixed batch's records are the
    same view of it in every layer; routing shapes; expert count; a selection mask in all layers or
    none); None otherwise (the caller loops over layers). Eager twin: that loop (test_mixlora)."""
    if len(recs) < 2:
        return None
    first = recs[0]
    e, mask = first.num_experts, first.token_mask
    routings = [r.routing for r in recs]
    r0 = routings[0]
    for r, ro in zip(recs, routings):
        if (r.num_experts != e or not _same_view(r.token_mask, mask) or (ro.selected is None) != (r0.selected is None)
                or ro.experts.shape != r0.experts.shape or ro.probs.shape != r0.probs.shape):
            return None
    stacked = Routing(None, torch.stack([ro.experts for ro in routings]), torch.stack([ro.probs for ro in routings]),
                      None if r0.selected is None else torch.stack([ro.selected for ro in routings]))
    return load_balance_terms(stacked, mask, e), e


def _same_view(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same tensor, or the same view of the same memory (masks are not written in a forward)."""
    if a is None or b is None or a is b:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def restore_before_state_dict(module, *args, **kwargs) -> None:
    restore_switch_weights(module.moelora_state)
