"""Whole-model tensor parallelism of an adapted Hugging Face model on torch DTensor (issue 18).

``parallelize(model, mesh, form)`` shards a model in place following the model's own
``config.base_model_tp_plan`` (the plan transformers' ``tp_plan="auto"`` uses: q/k/v/gate/up
column-parallel, o/down row-parallel), with torch's public DTensor API:

- a plain ``nn.Linear`` of the plan gets torch's ``ColwiseParallel`` / ``RowwiseParallel``;
- an adapted linear (``AdaptedLinear``: the frozen linear plus its adapter) is distributed as one
  module with ``distribute_module``: the frozen weight is sharded like the plain linear's, the
  adapter's factors get the placements of ``form`` (``PLACEMENTS``), the input is declared
  replicated (column) or sharded on its last dim (row) and the output is returned as the local
  shard (column) or all-reduced (row) — the same boundaries as torch's styles. The adapter's own
  forward (``methods/*/layer.py``) then runs on DTensors unchanged, and DTensor's sharding
  propagation decides the collectives: for ``"bdlora"`` it needs none beyond the base's (the
  block einsum is sharded on its block dim; the row delta is a Partial sum that joins the base's
  all-reduce), for ``"slora"`` one all-gather of x·A per column-parallel linear.

Everything else (embeddings, norms, the head) stays replicated as plain tensors: every rank
holds the same full model before the call. Adapter gradients come out as DTensors with the
parameters' placements (the ``"replicated"`` form's are summed over ranks by DTensor), so any
torch optimizer steps them. Why not transformers' ``from_pretrained(tp_plan="auto")``: its hooks
sit on the frozen ``nn.Linear``, which an ``AdaptedLinear`` calls through ``F.linear`` without
running the linear's forward, and its API moved between the transformers releases we support
(5.17 → 5.24). We read its plan, not its hooks.
"""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

FORMS = ("bdlora", "slora", "replicated")
# Plan entries for modules that hold no adapter and no sharded weight: frozen norms stay replicated.
_REPLICATED_STYLES = ("replicated_with_grad_allreduce",)

# (form, role) -> placements of (lora_A, lora_B). Column role: output features sharded; row role:
# input features sharded. Block parameters (BdLoraAdapter): column lora_A (R, in) / lora_B (out, R/N)
# whose row chunk i is block B_ii; row lora_A (R, in/N) whose row chunk i is block A_ii / lora_B (out, R).
PLACEMENTS = {
    ("bdlora", "column"): (Shard(0), Shard(0)),  # A's rank slice i, block B_ii: the output slice is local
    ("bdlora", "row"): (Shard(0), Shard(1)),  # block A_ii, B's rank slice i: a partial sum of the output
    ("slora", "column"): (Shard(0), Shard(0)),  # A along the rank, B along the output: x·A is all-gathered
    ("slora", "row"): (Shard(1), Replicate()),  # A along the input: x_i·A_i is a partial sum
    ("replicated", "column"): (Replicate(), Replicate()),  # every rank computes the whole delta
    ("replicated", "row"): (Replicate(), Replicate()),
}
_KIND_OF_FORM = {"bdlora": "bdlora", "slora": "lora", "replicated": "lora"}


def tp_roles(model: nn.Module) -> dict[str, str]:
    """Module path -> "column" / "row" (or "replicated") from ``model.config.base_model_tp_plan``."""
    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__} has no config.base_model_tp_plan: its architecture does not "
                         "declare how to shard it for tensor parallelism")
    prefix = model.base_model_prefix
    roles: dict[str, str] = {}
    names = [n for n, _ in model.named_modules()]
    for key, style in plan.items():
        if style == "colwise":
            role = "column"
        elif style == "rowwise":
            role = "row"
        elif style in _REPLICATED_STYLES:
            role = "replicated"
        else:
            raise ValueError(f"tp_plan entry {key!r}: {style!r} is not supported (colwise, rowwise and "
                             f"{_REPLICATED_STYLES} are); fused projections such as Phi-3's qkv_proj are not")
        pattern = re.compile(re.escape(f"{prefix}.{key}").replace(r"\*", r"\d+") + "$")
        for name in names:
            if pattern.match(name):
                roles[name] = role
    return roles


def _adapters(model: nn.Module) -> list:
    state = getattr(model, "moelora_state", None)
    return [] if state is None else list(state.adapters.values())


def check_parallelizable(model: nn.Module, tp_size: int, form: str | None = None) -> str | None:
    """Check that ``model`` can be sharded over ``tp_size`` ranks in ``form`` (without changing it);
    returns the form to use (``None``: the model has no adapter). Raises ``ValueError`` /
    ``NotImplementedError`` naming what does not fit."""
    cfg = model.config
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(cfg, key, None)
        if heads is not None and heads % tp_size:
            raise ValueError(f"config.{key}={heads} is not divisible by the tensor-parallel size {tp_size}: "
                             "each rank must hold whole attention heads")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model is already parallelized (it holds DTensor parameters)")
    roles = tp_roles(model)
    adapters = _adapters(model)
    if len(adapters) > 1:
        raise NotImplementedError(f"the model holds {len(adapters)} adapters {[a.name for a in adapters]}; "
                                  "tensor parallelism takes one (delete the others first)")
    if not adapters:
        form = None
    else:
        method = adapters[0].config.method
        if method == "bdlora":
            form = form or "bdlora"
            nblocks = adapters[0].config.nblocks
            if nblocks != tp_size:
                raise ValueError(f"the block-diagonal adapter has nblocks={nblocks} but the tensor-parallel size is "
                                 f"{tp_size}: its blocks must be the ranks' shards (BdLoraConfig(nblocks={tp_size}))")
        elif method == "lora":
            form = form or "slora"
        else:
            raise NotImplementedError(f"tensor parallelism of {method!r} adapters is not implemented "
                                      "(block-diagonal LoRA and plain LoRA are)")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if _KIND_OF_FORM[form] != method:
            raise ValueError(f"form {form!r} shards {_KIND_OF_FORM[form]!r} adapters, the model's adapter is {method!r}")
    modules = dict(model.named_modules())
    for name, role in roles.items():
        if role == "replicated":
            continue
        mod = modules[name]
        site_adapters = getattr(mod, "adapters", {})
        for a in site_adapters.values():
            if getattr(a, "merged", False):
                raise ValueError(f"{name}: a merged LoRA cannot be sharded; unmerge it first (moelora.unmerge_lora)")
            if a.kind == "bdlora" and a.role != role:
                raise ValueError(f"{name} is {role}-parallel in the model's tp_plan but the block-diagonal adapter "
                                 f"treats it as {a.role}-parallel (BdLoraConfig column_modules/row_modules)")
        side = mod.out_features if role == "column" else mod.in_features
        if side % tp_size:
            raise ValueError(f"{name}: {'out' if role == 'column' else 'in'}_features={side} is not divisible by "
                             f"the tensor-parallel size {tp_size}")
    return form


def _partition(role: str, form: str | None, name: str, module: nn.Module, mesh) -> None:
    """distribute_module's partition_fn, called on every submodule of one adapted linear."""
    if isinstance(module, nn.Linear):  # the frozen base: sharded like torch's Colwise/RowwiseParallel
        placement = {"weight": Shard(0) if role == "column" else Shard(1),
                     "bias": Shard(0) if role == "column" else Replicate()}
    elif getattr(module, "kind", None) in ("lora", "bdlora"):
        a, b = PLACEMENTS[(form, role)]
        placement = {"lora_A": a, "lora_B": b}
    else:
        return
    for leaf, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(leaf, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement[leaf]]),
                                                     requires_grad=p.requires_grad))


def _input(role: str, module, inputs, mesh):
    """The local input as a DTensor: replicated (column) or this rank's slice of the features (row)."""
    x, *rest = inputs
    layout = Replicate() if role == "column" else Shard(x.dim() - 1)
    return (DTensor.from_local(x, mesh, [layout], run_check=False), *rest)


def _output(role: str, module, output, mesh):
    """Back to a local tensor: the output slice (column) or the all-reduced sum (row: the base
    layer's own all-reduce, which the block-diagonal delta's partial sum joins)."""
    if role == "row":
        output = output.redistribute(mesh, [Replicate()])
    return output.to_local()


def parallelize(model: nn.Module, mesh, form: str | None = None) -> nn.Module:
    """Shard ``model`` (and its one adapter) over the 1-D ``mesh`` in place; returns it.

    ``form``: ``"bdlora"`` (the default for a ``BdLoraConfig`` adapter, whose ``nblocks`` must
    equal the mesh size), ``"slora"`` (the default for plain LoRA: S-LoRA-style sharded factors)
    or ``"replicated"`` (plain LoRA whole on every rank). Call it on every rank, after injecting or
    loading the adapter, with the same weights on every rank; then run the model as usual
    (forward, backward, ``generate``) with the same inputs on every rank."""
    if mesh.ndim != 1:
        raise ValueError(f"parallelize takes a 1-D mesh (tensor parallelism only), got {mesh.ndim} dimensions")
    form = check_parallelizable(model, mesh.size(), form)
    modules = dict(model.named_modules())
    for name, role in tp_roles(model).items():
        if role == "replicated":
            continue
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            parallelize_module(mod, mesh, ColwiseParallel() if role == "column" else RowwiseParallel())
        else:  # an AdaptedLinear: base and adapter sharded together, one input and one output boundary
            distribute_module(mod, mesh, partial(_partition, role, form), partial(_input, role), partial(_output, role))
    return model


def full_adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``moelora.adapter_state_dict`` of a parallelized model with every tensor gathered whole
    (a collective: call it on every rank), ready for ``moelora.load_adapter_state_dict`` into an
    unsharded model and ``moelora.save_adapter``."""
    from ..inject import adapter_state_dict

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in
            adapter_state_dict(model, adapter_name).items()}


__all__ = ["FORMS", "PLACEMENTS", "check_parallelizable", "full_adapter_state_dict", "parallelize", "tp_roles"]
