"""The adapter API: many adapters of mixed methods over one frozen base model.

``inject_adapter`` / ``add_adapter`` put adapters on a Hugging Face causal LM in place (the base
is frozen; adapter parameters are ``lora_*`` / ``router*``); each adapter has a name, and every
forward picks one per sequence (``adapter_names``) or uses the active one (``set_adapter``,
``use_adapter``). All state lives in one ``AdapterState`` at ``model.moelora_state``
(``moelora/state.py``); the methods live in ``moelora/methods/<method>/`` and are found through
``methods/registry.py``. Adding an architecture is one entry in ``moelora.ARCHITECTURES``.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn as nn

from . import generation, hooks
from .architectures import (  # noqa: F401 - re-exported
    ARCHITECTURES,
    ArchSpec,
    UnsupportedArchitectureError,
    actual_names,
    arch_spec,
    decoder_layers,
    get_submodule,
)
from .layers.adapted import AdaptedFFN, AdaptedLinear, AdapterRouters
from .layers.decode_graphs import clear_decode_graphs
from .layers.router import load_balance_terms, routing_entropy
from .methods.base import AdapterConfigError
from .methods.lora_switch.layer import restore_switch_weights
from .methods.registry import INJECTORS
from .state import AdapterInfo, AdapterState, BatchPlan

DEFAULT_ADAPTER = "default"
_SITES = (AdaptedLinear, AdaptedFFN, AdapterRouters)


def is_adapter_parameter(name: str) -> bool:
    """Adapter parameters are named lora_* or live in a router: one filter says what trains."""
    parts = name.split(".")
    return any(p.startswith("lora_") or p == "router" or p.startswith("router_") for p in parts)


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's AdapterState, or None when moelora never touched it."""
    return model.__dict__.get("moelora_state")


def _require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise ValueError("this model has no moelora adapter; call moelora.inject_adapter(model, cfg) first")
    return state


def _resolve(state: AdapterState, adapter_name: str | None) -> str:
    """adapter_name, or the active adapter, or the only one."""
    if adapter_name is not None:
        state._check_known(adapter_name)
        return adapter_name
    if state.active is not None:
        return state.active
    if len(state.adapters) == 1:
        return next(iter(state.adapters))
    raise ValueError(f"no adapter is active and the model has {sorted(state.adapters)}: pass adapter_name=")


# ---- walking the module tree without the other adapters ---------------------------------------
def _walk(model: nn.Module, into: frozenset | set | tuple = ()) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` in its order, without the insides of the adapters: every site's
    ``adapters`` ModuleDict is yielded, its entries (adapter roots) and their modules only for
    the names in ``into``. What an operation on adapter X reads or changes is the base, the sites
    and X's own modules; walking every adapter's modules made each add/delete/load O(adapters x
    sites) (a served model with 32 resident slots: ~29k modules, ~0.5 s of host time per swap)."""
    memo: set[int] = set()

    def visit(prefix: str, module: nn.Module, inside: bool):
        if id(module) in memo:
            return
        memo.add(id(module))
        yield prefix, module
        site = not inside and isinstance(module, _SITES)
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if site and name == "adapters":
                if id(child) in memo:
                    continue
                memo.add(id(child))
                yield path, child
                for adapter, root in child.named_children():
                    if adapter in into:
                        yield from visit(f"{path}.{adapter}", root, True)
                continue
            yield from visit(path, child, inside)

    yield from visit("", model, False)


def _sites(model: nn.Module) -> list:
    """Every adapted module (AdaptedLinear, AdaptedFFN, AdapterRouters) of ``model``."""
    return [m for _, m in _walk(model) if isinstance(m, _SITES)]


# ---- transactions ---------------------------------------------------------------------------
def _shallow(v):
    if isinstance(v, dict):
        return type(v).copy(v) if hasattr(type(v), "copy") else dict(v)
    if isinstance(v, (list, set)):
        return type(v)(v)
    return v


def _restore_container(obj, saved) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    elif isinstance(obj, set):
        obj.clear()
        obj.update(saved)


class _Snapshot:
    """What a failed inject/add/load/delete must put back: the attributes of every module outside
    the adapters' own subtrees (``_walk``: the base, the sites and their ``adapters`` dicts: child
    modules, parameters, buffers, hook dicts, flags, i.e. the ``__dict__`` and the contents of its
    dicts/lists/sets), the model's class, those modules' parameters' ``requires_grad``, and the
    AdapterState's fields. The adapters' own modules are left out: an operation on adapter X adds
    or drops X's modules as a whole (the sites' dicts say which are there) and changes no other
    adapter's (``add_adapter`` sets the train mode of X's modules only). Parameter values are not
    copied: the operations only write the new adapter's tensors (dropped with it) or undo their
    own value changes (``on_rollback``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cls = model.__class__
        self.objects = []
        self.grads = []
        for _, m in _walk(model):
            self._take(m)
            self.grads.extend((p, p.requires_grad) for p in m.parameters(recurse=False))
        state = adapter_state(model)
        if state is not None:
            self._take(state)
        self.on_rollback: list = []

    def _take(self, obj) -> None:
        d = obj.__dict__
        self.objects.append((obj, dict(d), {k: _shallow(v) for k, v in d.items()
                                            if isinstance(v, (dict, list, set))}))

    def rollback(self) -> None:
        for obj, attrs, contents in self.objects:
            d = obj.__dict__
            for k in [k for k in d if k not in attrs]:
                del d[k]
            for k, v in attrs.items():
                d[k] = v
                if k in contents:
                    _restore_container(v, contents[k])
        self.model.__class__ = self.cls
        for p, g in self.grads:
            p.requires_grad_(g)
        for undo in reversed(self.on_rollback):
            undo()
        clear_decode_graphs(self.model)  # derived caches: rebuilt when needed


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[_Snapshot]:
    """On any error (or KeyboardInterrupt) inside the block, put ``model`` back exactly as it was
    at entry (see ``_Snapshot``) and re-raise. A merged LoRA-Switch selection is restored to the
    pristine base weights first (the same model, as after every ``generate``)."""
    state = adapter_state(model)
    if state is not None:
        restore_switch_weights(state)
    snap = _Snapshot(model)
    try:
        yield snap
    except BaseException:
        snap.rollback()
        raise


def _refuse_peft(model: nn.Module) -> None:
    wrapped = type(model).__module__.split(".")[0] == "peft" or any(
        type(m).__module__.split(".")[0] == "peft" for _, m in _walk(model))
    if wrapped or getattr(model, "peft_config", None) is not None:
        raise ValueError(
            "this model is wrapped by PEFT (peft.PeftModel or PEFT LoRA layers): moelora adapts a plain "
            "Hugging Face model; load the plain base model (or call model.unload() / "
            "merge_and_unload() on the PEFT model first), then inject moelora adapters into it"
        )


def _target_paths(model: nn.Module, cfg, spec, layers) -> list[tuple[str, nn.Module]]:
    """(path, module) of every linear ``cfg`` would wrap (also inside an existing AdaptedFFN)."""
    paths = {id(m): n for n, m in _walk(model)}
    out = []
    attn_targets = getattr(cfg, "target_modules", None) or getattr(cfg, "attention_target_modules", ())
    mlp_targets = getattr(cfg, "target_modules", None) or getattr(cfg, "expert_target_modules", ())
    if cfg.method == "mixlora":  # the whole FFN is shared by the experts: all its projections must be linears
        mlp_targets = tuple(spec.mlp)
    for layer in layers:
        for attr_name, mapping, logical in ((spec.attn_attr, spec.attn, attn_targets),
                                            (spec.mlp_attr, spec.mlp, mlp_targets)):
            parent = getattr(layer, attr_name)
            if isinstance(parent, AdaptedFFN):
                parent = parent.base_layer
            for attr in actual_names(mapping, logical):
                mod = getattr(parent, attr, None)
                out.append((f"{paths.get(id(parent), '?')}.{attr}", mod))
    return out


def _preflight(model: nn.Module, cfg, spec, layers) -> None:
    """Refuse, before anything changes, targets that cannot be adapted (names the first one)."""
    for path, mod in _target_paths(model, cfg, spec, layers):
        if isinstance(mod, AdaptedLinear):
            mod = mod.base_layer
        if mod is None:
            raise TypeError(f"{path} does not exist: this model does not have the layout of its "
                            f"model_type {model.config.model_type!r} (moelora.ARCHITECTURES)")
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{path} is a {type(mod).__module__}.{type(mod).__qualname__}, not a torch.nn.Linear: "
                            "moelora adapts plain linear projections only (put the original nn.Linear back, "
                            "or leave this projection out of the config's target modules)")
        if not mod.weight.is_floating_point():
            raise TypeError(f"{path} has a {mod.weight.dtype} weight: moelora adapts floating-point linears only "
                            "(quantized bases are not supported)")


# ---- adding and removing --------------------------------------------------------------------
def inject_adapter(model: nn.Module, cfg, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap the target modules of ``model`` in place with the adapter ``cfg`` describes, as the
    adapter ``adapter_name`` (default "default"), and make it active.

    The base model is frozen; only adapter parameters (``lora_*``, ``router*``) train. Returns
    the same model object, whose forward now adds the router load-balance loss to ``.loss``.
    ``cfg`` is copied, never changed. On any error the model is left exactly as it was."""
    if adapter_state(model) is not None:
        raise ValueError("this model already has moelora adapters "
                         f"({sorted(adapter_state(model).adapters)}); add another with "
                         "moelora.add_adapter(model, name, cfg), or call moelora.remove_adapter(model) first")
    _refuse_peft(model)
    with transaction(model):
        add_adapter(model, adapter_name, cfg)
        set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, adapter_name: str, cfg, trainable: bool = True) -> nn.Module:
    """Add one more adapter (any method, rank, expert count) beside the model's others. It is
    not made active (``set_adapter``); ``trainable=False`` keeps its parameters frozen.
    On any error the model is left exactly as it was (modules, requires_grad flags, state)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    injector = INJECTORS.get(type(cfg))
    if injector is None:
        raise AdapterConfigError(f"expected a LoraConfig, MixLoraConfig or LoraSwitchConfig, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg).validate()  # the caller's object is never changed
    _refuse_peft(model)
    spec = arch_spec(model)
    layers = decoder_layers(model, spec)
    state = adapter_state(model)
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or "
                         f"moelora.delete_adapter(model, {adapter_name!r}) first")
    _preflight(model, cfg, spec, layers)
    cfg.base_model_type = model.config.model_type
    if cfg.base_model_name_or_path is None:
        cfg.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    with transaction(model):  # on any error: modules, flags, hooks, class, state as they were
        if state is None:
            state = _install(model, spec)
        injector(model, layers, spec, adapter_name, cfg, state)
        state.adapters[adapter_name] = AdapterInfo(adapter_name, cfg, trainable)
        for p in _adapter_parameters(model, adapter_name).values():
            p.requires_grad_(trainable)
        # New modules start in training mode; match the model's mode so eval() models stay
        # deterministic. Only the new ones: the base and the other adapters keep their flags.
        _match_mode(model, adapter_name)
    return model


def _match_mode(model: nn.Module, adapter_name: str) -> None:
    """The model's train/eval mode on its sites (new ones among them) and on ``adapter_name``'s modules."""
    mode = model.training
    for site in _sites(model):
        site.training = site.adapters.training = mode
        if adapter_name in site.adapters:
            site.adapters[adapter_name].train(mode)


def _install(model: nn.Module, spec) -> AdapterState:
    state = AdapterState()
    stack = get_submodule(model, spec.stack)
    for p in model.parameters():
        p.requires_grad_(False)
    model.moelora_state = state
    stack.moelora_state = state  # the decoder stack's hooks find the same owner
    state.handles = [
        model.register_forward_pre_hook(hooks.top_pre, with_kwargs=True),
        model.register_forward_hook(hooks.top_post, with_kwargs=True),
        stack.register_forward_pre_hook(hooks.stack_pre, with_kwargs=True),
        stack.register_forward_hook(hooks.stack_post, with_kwargs=True, always_call=True),
        model.register_state_dict_pre_hook(hooks.restore_before_state_dict),
        model.register_load_state_dict_pre_hook(hooks.restore_before_state_dict),
    ]
    model.__class__ = generation.adapted_class(type(model))
    return state


def _uninstall(model: nn.Module, state: AdapterState) -> None:
    restore_switch_weights(state)
    clear_decode_graphs(model)
    for parent, attr, original in reversed(state.originals):
        if original is None:  # a module the adapter added (LoRA-Switch's routers)
            if attr in parent._modules:
                delattr(parent, attr)
        else:
            setattr(parent, attr, original)
    state.originals.clear()
    for h in state.handles + ([state.switch_hook] if state.switch_hook is not None else []):
        h.remove()
    model.__class__ = generation.original_class(type(model))
    stack = get_submodule(model, arch_spec(model).stack)
    for m in (model, stack):
        m.__dict__.pop("moelora_state", None)


def _drop_adapter_modules(model: nn.Module, state: AdapterState, name: str) -> None:
    """Take adapter ``name`` out of every site; unwrap sites left without adapters."""
    sites = _sites(model)
    for m in sites:
        if name in m.adapters:
            # the adapter's own modules' decode graphs. The site's graphs stay: they are keyed by the
            # address and shape of every stack they read, so a stack rebuilt without this adapter is
            # captured again on its own, and one rewritten in place replays correctly. Clearing
            # them here threw away every bucket's serving graph at each slot eviction, re-captured
            # inside the next timed steps (the warm-up's seconds per bucket on the 7B shape).
            clear_decode_graphs(m.adapters[name])
            del m.adapters[name]
    keep = []
    for parent, attr, original in reversed(state.originals):
        cur = getattr(parent, attr, None)
        if isinstance(cur, _SITES) and len(cur.adapters) == 0:
            if original is None:
                delattr(parent, attr)
            else:
                setattr(parent, attr, original)
        else:
            keep.append((parent, attr, original))
    state.originals[:] = list(reversed(keep))
    # (``sites`` as before the unwrapping: a router site left empty was just taken out)
    if not any(isinstance(m, AdapterRouters) and len(m.adapters) for m in sites) and state.switch_hook is not None:
        state.switch_hook.remove()
        state.switch_hook = None


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one adapter and its modules; the others stay as they are. Deleting the active
    adapter leaves the base model active; deleting the last one is ``remove_adapter``."""
    state = _require_state(model)
    state._check_known(adapter_name)
    with transaction(model) as tx:  # on any error: the model exactly as before, merged LoRA included
        if state.merged_lora == adapter_name:
            unmerge_lora(model)
            tx.on_rollback.append(lambda: _remerge(model, adapter_name))
        if len(state.adapters) == 1:
            return remove_adapter(model)
        _drop_adapter_modules(model, state, adapter_name)
        del state.adapters[adapter_name]
        state.switch.pop(adapter_name, None)
        state.records.pop(adapter_name, None)
        if state.active == adapter_name:
            set_adapter(model, None)
    return model


def _remerge(model: nn.Module, name: str) -> None:
    """Fold ``name``'s LoRA deltas in again after a rolled-back delete had taken them out."""
    for site, a in _lora_sites(model, name):
        a.merged = False
        a.merge(site)


def remove_adapter(model: nn.Module) -> nn.Module:
    """Undo every ``inject_adapter``/``add_adapter``: put the original modules back (their
    requires_grad flags stay as they are)."""
    state = adapter_state(model)
    if state is None:
        return model
    if state.merged_lora is not None:
        unmerge_lora(model)
    _uninstall(model, state)
    return model


# ---- choosing adapters ----------------------------------------------------------------------
def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the active adapter (None: the base model) for forwards and
    ``generate`` calls that pass no ``adapter_names``."""
    state = _require_state(model)
    if adapter_name is not None:
        state._check_known(adapter_name)
    if state.merged_lora is not None and adapter_name != state.merged_lora:
        raise RuntimeError(f"adapter {state.merged_lora!r} is merged into the base weights; "
                           "call moelora.unmerge_lora(model) first")
    state.active = adapter_name
    if not state.in_forward:
        state.plan = BatchPlan(adapter_name)


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str | None) -> Iterator[nn.Module]:
    """``set_adapter`` for the block; the previously active adapter is back on exit (also after an exception)."""
    state = _require_state(model)
    old = state.active
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_adapter(model, old)


def list_adapters(model: nn.Module) -> list[dict]:
    """One dict per adapter: name, method, trainable, active, and its config as a dict."""
    state = adapter_state(model)
    if state is None:
        return []
    return [{"name": n, "method": i.method, "trainable": i.trainable, "active": n == state.active,
             "config": i.config.to_dict()} for n, i in state.adapters.items()]


def get_adapter_config(model: nn.Module, adapter_name: str | None = None):
    """The config of ``adapter_name`` (default: the active or only adapter); None without adapters."""
    state = adapter_state(model)
    if state is None or not state.adapters:
        return None
    return state.adapters[_resolve(state, adapter_name)].config


def switch_state(model: nn.Module, adapter_name: str | None = None):
    """The LoRA-Switch merge/routing state of ``adapter_name`` (benchmarks and tests), or None."""
    state = adapter_state(model)
    if state is None or not state.switch:
        return None
    if adapter_name is None and state.active not in state.switch and len(state.switch) == 1:
        return next(iter(state.switch.values()))
    return state.switch.get(_resolve(state, adapter_name))


def restore_base_weights(model: nn.Module) -> None:
    """Write the pristine base weights back if a LoRA-Switch selection is merged (custom decode loops)."""
    state = adapter_state(model)
    if state is not None:
        restore_switch_weights(state)


# ---- merging plain LoRA ---------------------------------------------------------------------
def _lora_sites(model: nn.Module, name: str):
    for m in _sites(model):
        if isinstance(m, AdaptedLinear):
            a = m.adapters[name] if name in m.adapters else None
            if a is not None and a.kind == "lora":
                yield m, a


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapter's plain LoRA deltas into the base weights (exactly undone by
    ``unmerge_lora``). While merged, forwards must use that adapter only."""
    state = _require_state(model)
    name = _resolve(state, None)
    if state.merged_lora not in (None, name):
        raise RuntimeError(f"adapter {state.merged_lora!r} is merged already; unmerge_lora(model) first")
    restore_switch_weights(state)
    for site, a in _lora_sites(model, name):
        a.merge(site)
    state.merged_lora = name


def unmerge_lora(model: nn.Module) -> None:
    state = adapter_state(model)
    if state is None or state.merged_lora is None:
        return
    for site, a in _lora_sites(model, state.merged_lora):
        a.unmerge(site)
    state.merged_lora = None


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block, then give the adapters back::

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
    state = adapter_state(model)
    if state is None or state.disabled:
        yield model
        return
    restore_switch_weights(state)
    merged = state.merged_lora
    if merged is not None:
        unmerge_lora(model)
    swapped = []
    for parent, attr, original in state.originals:
        if original is not None:  # None: a module the adapter added (LoRA-Switch's routers): unused while disabled
            swapped.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, original)
    state.disabled = True
    state.records = {}
    try:
        yield model
    finally:
        for parent, attr, adapted in reversed(swapped):
            setattr(parent, attr, adapted)
            adapted.train(model.training)
        state.disabled = False
        state.records = {}
        if merged is not None:
            with use_adapter(model, merged):
                merge_lora(model)


# ---- introspection --------------------------------------------------------------------------
def _records(model: nn.Module, adapter_name: str | None) -> dict:
    state = adapter_state(model)
    if state is None or not state.records:
        return {}
    if adapter_name is None and state.active not in state.records and len(state.records) == 1:
        return next(iter(state.records.values()))
    return state.records.get(adapter_name if adapter_name is not None else state.active, {})


def router_statistics(model: nn.Module, adapter_name: str | None = None) -> list[dict]:
    """Per routed layer of ``adapter_name`` (default: the active one), from the last forward:
    expert load fractions, mean probability (importance), mean per-token entropy, the
    coefficient of variation of the load, and the mean number of experts a token runs through
    (``experts_per_token``: top_k for top-k routing, what top-p selects for dynamic routing).
    In a mixed batch each adapter's statistics cover its own sequences. Empty after a torch.compile'd inference forward, which keeps no routing
    records (see ``AdapterState.record``); run the analysis forward uncompiled."""
    stats = []
    records = _records(model, adapter_name)
    with torch.no_grad():
        for layer in sorted(records):
            r = records[layer]
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
                "experts_per_token": counts.sum() / n,
                "tokens": n,
            })
    return stats


def routing_records(model: nn.Module, adapter_name: str | None = None) -> dict[int, tuple]:
    """Per routed layer, the last forward's (experts (N, K), weights (N, K), token mask (N,))."""
    # Copies: at eager decode steps the routing tensors are CUDA-graph outputs (decode_graphs)
    # that the next step overwrites, and a caller may keep these records across steps.
    return {i: (r.routing.experts.detach().clone(), r.routing.weights.detach().clone(),
                None if r.token_mask is None else r.token_mask.clone())
            for i, r in _records(model, adapter_name).items()}


def trainable_parameters(model: nn.Module) -> dict:
    """Counts of trainable (adapter) and total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


# ---- adapter tensors by name ----------------------------------------------------------------
def canonical_key(key: str, adapter_name: str) -> str | None:
    """The file key of one adapter's parameter (the module path with ``adapters.<name>`` and
    ``base_layer`` left out: the same keys whatever other adapters share the model), or None
    when ``key`` belongs to another adapter or the base."""
    parts = key.split(".")
    out, found, i = [], False, 0
    while i < len(parts):
        if parts[i] == "adapters" and i + 1 < len(parts):
            if parts[i + 1] != adapter_name:
                return None
            found = True
            i += 2
            continue
        if parts[i] != "base_layer":
            out.append(parts[i])
        i += 1
    return ".".join(out) if found else None


def _adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """canonical key -> parameter of ``adapter_name``, in ``named_parameters()`` order (``_walk``
    visits the same modules in the same order, less the other adapters' subtrees)."""
    out, seen = {}, set()
    for path, m in _walk(model, into=(adapter_name,)):
        for k, p in m.named_parameters(prefix=path, recurse=False):
            c = canonical_key(k, adapter_name)
            if c is not None and id(p) not in seen:
                seen.add(id(p))
                out[c] = p
    return out


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """The live parameters of ``adapter_name`` (default: the active or only adapter), keyed as
    ``adapter_state_dict`` keys them: what an optimizer of that adapter alone takes (custom
    training loops; ``model.named_parameters()`` filtered by name walks every adapter's modules)."""
    state = _require_state(model)
    return _adapter_parameters(model, _resolve(state, adapter_name))


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Only the tensors of ``adapter_name`` (default: the active or only adapter), detached,
    keyed by their module path without ``adapters.<name>``/``base_layer`` (the file format)."""
    state = _require_state(model)
    return {k: p.detach() for k, p in _adapter_parameters(model, _resolve(state, adapter_name)).items()}


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Copy one adapter's tensors in, strictly: every key must exist with the same shape, every
    tensor of that adapter must be given, and all must be floating point (an integer or bool
    tensor is refused by name). Validates everything before changing anything."""
    state = _require_state(model)
    params = _adapter_parameters(model, _resolve(state, adapter_name))
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"adapter tensors do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    not_tensor = sorted(k for k in params if not isinstance(tensors[k], torch.Tensor))
    if not_tensor:
        raise TypeError(f"adapter value {not_tensor[0]!r} is a {type(tensors[not_tensor[0]]).__name__}, not a tensor")
    not_float = sorted(k for k in params if not tensors[k].is_floating_point())
    if not_float:
        k = not_float[0]
        raise ValueError(f"{len(not_float)} adapter tensor(s) are not floating point, e.g. {k} "
                         f"({str(tensors[k].dtype).replace('torch.', '')}): adapter weights must be float tensors")
    bad = [(k, tuple(tensors[k].shape), tuple(p.shape)) for k, p in params.items() if tensors[k].shape != p.shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"shape mismatch for {len(bad)} adapter tensor(s), e.g. {k}: file {got}, model {want}")
    waits = set()
    with torch.no_grad():
        for k, p in params.items():
            src = tensors[k]
            if p.is_cuda and src.dtype == p.dtype and src.device.type == "cpu" and src.is_pinned():
                # from pinned host memory (the serving registry's cache): queued, and ONE wait below;
                # a blocking copy waits for the device once per tensor (~1,800 of a 7B MixLoRA adapter)
                p.copy_(src, non_blocking=True)
                waits.add(p.device)
            else:
                p.copy_(src.to(p.dtype))
    for dev in waits:  # the tensors are in place when this returns, whichever stream reads them next
        torch.cuda.current_stream(dev).synchronize()
