"""Injection of adapters into Hugging Face causal LMs.

``ARCHITECTURES`` maps ``config.model_type`` to where the decoder layers live and what their
linears are called. Adding an architecture is one entry in that table (see README).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import (
    ATTENTION_MODULES,
    AdapterConfig,
    AdapterConfigError,
    LoraConfig,
    LoraSwitchConfig,
    MixLoraConfig,
)
from .layers.context import RoutingContext
from .layers.decode_graphs import clear_decode_graphs
from .layers.lora import LoraLinear
from .layers.mixlora import MixLoraFFN
from .layers.router import load_balance_loss, load_balance_terms, routing_entropy


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not in ARCHITECTURES."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the adaptable modules of one architecture are.

    attn / mlp map our logical names (q_proj, ..., gate_proj, ...) to the attribute names of
    the attention and MLP modules. Fused projections (Phi-3's qkv_proj, gate_up_proj) appear as
    the value of several logical names; they are adapted once, as a whole.
    """

    layers: str = "model.layers"
    attn_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    attn: dict = field(default_factory=lambda: {m: m for m in ATTENTION_MODULES})
    mlp: dict = field(default_factory=lambda: {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
    act_attr: str = "act_fn"


_LLAMA_LIKE = ArchSpec()
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec(
        attn={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj"},
        mlp={"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
        act_attr="activation_fn",
    ),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: "
            f"{sorted(ARCHITECTURES)}. Add an entry to moelora.inject.ARCHITECTURES to support it."
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or arch_spec(model)
    obj = model
    for part in spec.layers.split("."):
        obj = getattr(obj, part)
    return obj


def _actual_names(mapping: dict, logical: tuple[str, ...]) -> list[str]:
    """Deduplicated attribute names for the logical targets, in first-seen order."""
    return list(dict.fromkeys(mapping[m] for m in logical if m in mapping))


def is_adapter_parameter(name: str) -> bool:
    """Adapter parameters are named lora_* or live in a router: one filter says what trains."""
    parts = name.split(".")
    return any(p.startswith("lora_") or p == "router" or p.startswith("router_") for p in parts)


# ---------------------------------------------------------------------------------------------
def inject_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap the target modules of ``model`` in place with the adapter ``cfg`` describes.

    The base model is frozen; only adapter parameters (``lora_*``, ``router*``) train. Returns
    the same model object, whose forward now adds the router load-balance loss to ``.loss``."""
    if getattr(model, "moelora_config", None) is not None:
        raise ValueError("this model already has a moelora adapter; call moelora.remove_adapter(model) first")
    if not isinstance(cfg, (LoraConfig, MixLoraConfig, LoraSwitchConfig)):
        raise AdapterConfigError(f"expected a LoraConfig, MixLoraConfig or LoraSwitchConfig, got {type(cfg).__name__}")
    cfg.validate()
    spec = arch_spec(model)
    layers = decoder_layers(model, spec)
    cfg.base_model_type = model.config.model_type
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    for p in model.parameters():
        p.requires_grad_(False)

    context = RoutingContext()
    originals: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, original) for remove_adapter

    def wrap_linear(parent: nn.Module, attr: str) -> None:
        base = getattr(parent, attr)
        originals.append((parent, attr, base))
        lin = LoraLinear(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.init_lora_weights,
                         cfg.adapter_dtype)
        lin._context = context
        setattr(parent, attr, lin)

    if isinstance(cfg, LoraConfig):
        for layer in layers:
            attn, mlp = getattr(layer, spec.attn_attr), getattr(layer, spec.mlp_attr)
            for name in _actual_names(spec.attn, cfg.target_modules):
                wrap_linear(attn, name)
            for name in _actual_names(spec.mlp, cfg.target_modules):
                wrap_linear(mlp, name)
    elif isinstance(cfg, MixLoraConfig):
        roles = _mlp_roles(spec)
        experts = tuple(_actual_names(spec.mlp, cfg.expert_target_modules))
        for i, layer in enumerate(layers):
            attn = getattr(layer, spec.attn_attr)
            for name in _actual_names(spec.attn, cfg.attention_target_modules):
                wrap_linear(attn, name)
            mlp = getattr(layer, spec.mlp_attr)
            originals.append((layer, spec.mlp_attr, mlp))
            setattr(layer, spec.mlp_attr, MixLoraFFN(mlp, i, cfg, context, roles, spec.act_attr, experts))
    else:
        from .layers.lora_switch import inject_lora_switch

        inject_lora_switch(model, layers, spec, cfg, context, originals)

    # New modules start in training mode; match the model's mode so eval() models stay deterministic.
    model.train(model.training)
    handles = [
        model.register_forward_pre_hook(_capture_inputs, with_kwargs=True),
        model.register_forward_hook(_add_aux_loss, with_kwargs=True),
    ]
    model.moelora_config = cfg
    model._moelora_context = context
    model._moelora_originals = originals
    model._moelora_handles = handles
    return model


def _mlp_roles(spec: ArchSpec) -> dict[str, str]:
    if spec.mlp["gate_proj"] == spec.mlp["up_proj"]:
        return {"gate_up": spec.mlp["gate_proj"], "down": spec.mlp["down_proj"]}
    return {"gate": spec.mlp["gate_proj"], "up": spec.mlp["up_proj"], "down": spec.mlp["down_proj"]}


def remove_adapter(model: nn.Module) -> nn.Module:
    """Undo ``inject_adapter``: put the original modules back and unfreeze nothing else."""
    if getattr(model, "moelora_config", None) is None:
        return model
    clear_decode_graphs(model)
    for hook in getattr(model, "_moelora_cleanup", []):
        hook()
    for parent, attr, original in reversed(model._moelora_originals):
        if original is None:  # a module the adapter added (LoRA-Switch's router)
            delattr(parent, attr)
        else:
            setattr(parent, attr, original)
    for h in model._moelora_handles:
        h.remove()
    for name in ("moelora_config", "_moelora_context", "_moelora_originals", "_moelora_handles", "_moelora_cleanup"):
        if hasattr(model, name):
            delattr(model, name)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block, then give the adapter back::

        with moelora.disable_adapter(model):
            ref_logits = model(ids).logits      # the frozen base: KL / DPO reference, A/B timing

    Unlike a flag inside each wrapper, the original modules themselves are put back (no wrapper
    call, no adapter math, no router, no aux loss), so the base runs exactly as it did before
    ``inject_adapter``; LoRA deltas folded in by ``merge_lora`` and a merged LoRA-Switch selection
    are taken back out of the weights first (``merge_lora``'d ones are folded in again on exit).
    Swapping costs one ``setattr`` per adapted module; a ``torch.compile``'d model follows the
    swap (its guards see the other module tree and it compiles for it). No-op without an adapter
    or when already disabled; the adapted modules return on exit (also after an exception), in
    the model's current train/eval mode."""
    ctx: RoutingContext | None = getattr(model, "_moelora_context", None)
    if ctx is None or ctx.disabled:
        yield model
        return
    from .layers.lora_switch import restore_base_weights

    restore_base_weights(model)
    merged = [m for m in model.modules() if isinstance(m, LoraLinear) and m.merged]  # merge_lora'd deltas
    for m in merged:
        m.unmerge()
    swapped = []
    for parent, attr, original in model._moelora_originals:
        if original is not None:  # None: a module the adapter added (LoRA-Switch's router): unused while disabled
            swapped.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, original)
    ctx.disabled = True
    ctx.last.clear()
    try:
        yield model
    finally:
        for parent, attr, adapted in reversed(swapped):
            setattr(parent, attr, adapted)
            adapted.train(model.training)
        for m in merged:
            m.merge()
        ctx.disabled = False
        ctx.last.clear()


# ---- hooks ----------------------------------------------------------------------------------
def _capture_inputs(module, args, kwargs):
    ctx: RoutingContext = module._moelora_context
    if ctx.disabled:
        return
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    ctx.attention_mask = mask
    ctx._mask_cache = None  # the token mask is cached for one forward (the mask may be updated in place)
    ctx.has_labels = kwargs.get("labels") is not None
    ctx.past_tokens = _cached_tokens(kwargs.get("past_key_values", kwargs.get("cache")))
    ctx.last.clear()


def _cached_tokens(cache) -> int:
    """Tokens already held by a dynamic KV cache (read off a tensor shape: no host sync). 0 for
    no cache, a static cache (its length is a device-side count) and under torch.compile.
    (transformers 5.17 passes the cache as ``past_key_values``, later 5.x as ``cache``.)"""
    if cache is None or torch.compiler.is_compiling():
        return 0
    from transformers import DynamicCache

    return int(cache.get_seq_length()) if isinstance(cache, DynamicCache) else 0


def _add_aux_loss(module, args, kwargs, output):
    ctx: RoutingContext = module._moelora_context
    cfg = module.moelora_config
    if torch.compiler.is_compiling() and not module.training:
        ctx.end_compiled_step()
    if not ctx.last or not (module.training or ctx.has_labels):
        return output  # decode/eval without labels: no extra work on the hot path
    # LoRA-Switch has one routed layer, so only MixLoRA offers the pooled form.
    aux = cfg.router_aux_loss_coef * aux_loss_from_context(ctx, getattr(cfg, "aux_loss_pooling", "layer_mean"))
    if isinstance(output, tuple):
        return output
    if getattr(output, "loss", None) is not None:
        output["loss"] = output.loss + aux.to(output.loss.dtype)
    output["aux_loss"] = aux
    return output


def aux_loss_from_context(ctx: RoutingContext, pooling: str = "layer_mean") -> torch.Tensor:
    """Load-balance loss (without coef) over the routed layers of the last forward."""
    terms = [(load_balance_terms(r.routing, r.token_mask, r.num_experts), r.num_experts) for r in ctx.last.values()]
    if pooling == "pooled":
        counts = sum(t[0][0] for t in terms)
        probs = sum(t[0][1] for t in terms)
        n = sum(t[0][2] for t in terms)
        return load_balance_loss(counts, probs, n, terms[0][1])
    losses = [load_balance_loss(c, p, n, e) for (c, p, n), e in terms]
    return torch.stack(losses).mean()


# ---- introspection --------------------------------------------------------------------------
def get_adapter_config(model: nn.Module):
    return getattr(model, "moelora_config", None)


def router_statistics(model: nn.Module) -> list[dict]:
    """Per routed layer, from the last forward: expert load fractions, mean probability
    (importance), mean per-token entropy, and the coefficient of variation of the load.
    Empty after a torch.compile'd inference forward, which keeps no routing records (see
    ``RoutingContext.record``); run the analysis forward uncompiled."""
    ctx: RoutingContext | None = getattr(model, "_moelora_context", None)
    if ctx is None:
        return []
    stats = []
    with torch.no_grad():
        for layer in sorted(ctx.last):
            r = ctx.last[layer]
            counts, probs, n = load_balance_terms(r.routing, r.token_mask, r.num_experts)
            n = n.clamp_min(1.0)
            load = counts / counts.sum().clamp_min(1.0)
            ent = routing_entropy(r.routing.probs)
            if r.token_mask is not None:
                ent = (ent * r.token_mask.float()).sum() / n
            else:
                ent = ent.mean()
            stats.append({
                "layer": layer,
                "load": load,
                "importance": probs / n,
                "entropy": ent,
                "load_cv": load.std(unbiased=False) / load.mean().clamp_min(1e-12),
                "tokens": n,
            })
    return stats


def routing_records(model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per routed layer, the last forward's (experts (N, K), weights (N, K), token mask (N,))."""
    ctx: RoutingContext | None = getattr(model, "_moelora_context", None)
    if ctx is None:
        return {}
    # Copies: at eager decode steps the routing tensors are CUDA-graph outputs (decode_graphs)
    # that the next step overwrites, and a caller may keep these records across steps.
    return {i: (r.routing.experts.detach().clone(), r.routing.weights.detach().clone(),
                None if r.token_mask is None else r.token_mask.clone()) for i, r in ctx.last.items()}


def trainable_parameters(model: nn.Module) -> dict:
    """Counts of trainable (adapter) and total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (lora_*, router*), detached, keyed by their module path."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_parameter(k)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors in, strictly: every key must exist with the same shape, and every
    adapter tensor of the model must be given. Validates everything before changing anything."""
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"adapter tensors do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"shape mismatch for {len(bad)} adapter tensor(s), e.g. {k}: file {got}, model {want}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
