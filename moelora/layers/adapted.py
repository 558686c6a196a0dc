"""The adapted modules: a frozen base module plus the adapters of every name that target it.

``AdaptedLinear`` wraps a frozen ``nn.Linear``, ``AdaptedFFN`` a decoder layer's MLP. Each holds
``adapters``: an ``nn.ModuleDict`` from adapter name to that method's module for this site
(``methods/<method>/layer.py``), and ``_state``: the model's ``AdapterState`` (a plain reference,
so ``copy.deepcopy`` of the model copies it consistently).

Execution, decided here for every forward from the state's ``BatchPlan``:
- a uniform batch (every sequence uses one adapter, or the base): that adapter's own
  ``forward_site`` with its fast paths, or the frozen module alone;
- a mixed batch: the frozen module once for all tokens, plus each adapter's delta on its tokens.
  At inference, when every adapter of the site is plain LoRA, all deltas go through ONE gathered
  shrink/expand (adapter slot = expert slot of ``moelora_kernels.gathered_lora``; ranks are
  zero-padded to the largest, which adds exact zeros). In training (concurrent training's mixed
  batches) gathered forms too: the tokens gathered by adapter through one batched GEMM pair
  (``_lora_slots_train``), and all top-k MixLoRA adapters of an FFN as one virtual-expert mixture
  over differentiable stacks.
  Otherwise (LoRA-Switch or block-diagonal LoRA rows, top-p/switch routing, router jitter in
  training, or ``dispatch.eager_mixed_batches()``) the eager loop over the batch's adapters, the
  reference the gathered forms are tested against.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _private
from . import decode_graphs
from .dispatch import decode_kernels_apply, gathered_kernel_applies, gathered_mixed_training, lazy_routing_records
from .lora_math import adapter_dropout, compute_dtype, lora_input
from .mix_recompute import _MixRecompute, recompute_applies

# ACT_NAMES: activation modules of transformers.activations that the fused MixLoRA decode kernel implements.
ACT_NAMES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
             "NewGELUActivation": "gelu_tanh", "GELUActivation": "gelu", "GELU": "gelu"}


def _only(site):
    """The site's one adapter (attribute shortcuts below); a clear error when it has several."""
    mods = list(site.adapters.values())
    if len(mods) != 1:
        active = site._state.active
        if active in site.adapters:
            return site.adapters[active]
        raise AttributeError(f"this module holds {len(mods)} adapters ({list(site.adapters)}); "
                             "use module.adapters[name]")
    return mods[0]


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``, never copied) plus ``adapters`` by name."""

    def __init__(self, base_layer: nn.Linear, state) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AdaptedLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self._state = state
        # the stacked adapters of the last mixed-batch composition, (names, stamps, stacks, epoch)
        # (``_cached_per_site``): a plain attribute, so a deepcopy carries its own and the compiled
        # decode step reads it directly
        self.batch_stacks: tuple | None = None

    # the frozen linear's interface (fused kernels read weight/bias of the projections)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # shortcuts to the one (or active) adapter: model.model.layers[0].self_attn.q_proj.lora_A
    @property
    def lora_A(self) -> torch.Tensor:
        return _only(self).lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        return _only(self).lora_B

    @property
    def experts(self):
        return _only(self).experts

    @property
    def merged(self) -> bool:
        return any(getattr(a, "merged", False) for a in self.adapters.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._state.plan
        if plan.mixed:
            return mixed_linear(self, x, plan)
        # one dict read per child, not nn.Module.__getattr__: this runs 224 times a decode step
        adapter = _private.module_dict_get(_private.submodule(self, "adapters"), plan.name)
        if adapter is None:
            # The base model (or an adapter that does not target this linear).
            return _private.frozen_linear(_private.submodule(self, "base_layer"), x)
        return adapter.forward_site(self, x)


class AdaptedFFN(nn.Module):
    """A decoder layer's frozen MLP (``base_layer``) plus the MixLoRA ``adapters`` by name.
    ``proj_names`` maps roles to the base MLP's attributes: gated MLPs use gate/up/down;
    Phi-3 uses a fused gate_up projection ('gate_up')."""

    def __init__(self, base_mlp: nn.Module, layer_idx: int, state, proj_names: dict[str, str], act_attr: str) -> None:
        super().__init__()
        self.base_layer = base_mlp
        self.adapters = nn.ModuleDict()
        self.layer_idx = layer_idx
        self.proj_names = dict(proj_names)  # role -> attribute, roles: gate, up, gate_up, down
        self.act_fn = getattr(base_mlp, act_attr)
        self.act_name = ACT_NAMES.get(type(self.act_fn).__name__)  # None: no fused decode kernel
        self.fused_gate_up = "gate_up" in proj_names
        self._state = state
        # the stacked adapters of the last mixed-batch composition, (names, stamps, stacks, epoch)
        # (``_cached_per_site``): a plain attribute, so a deepcopy carries its own and the compiled
        # decode step reads it directly
        self.batch_stacks: tuple | None = None

    @property
    def router(self):
        return _only(self).router

    @property
    def experts(self):
        return _only(self).experts

    def _proj(self, role: str) -> nn.Module:
        return getattr(self.base_layer, self.proj_names[role])

    def _in_roles(self) -> tuple[str, ...]:
        return ("gate_up",) if self.fused_gate_up else ("gate", "up")

    def _activate(self, pre: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = pre["gate_up"].chunk(2, dim=-1)  # Phi-3 order: gate first
            return up * self.act_fn(gate)
        return self.act_fn(pre["gate"]) * pre["up"]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        plan = self._state.plan
        if plan.mixed:
            return mixed_ffn(self, hidden_states, plan)
        adapter = _private.module_dict_get(self.adapters, plan.name)
        if adapter is None:
            return self.base_layer(hidden_states)  # its projections may carry LoRA adapters
        return adapter.forward_site(self, hidden_states)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}"


class AdapterRouters(nn.Module):
    """LoRA-Switch's layer-0 routers, one per LoRA-Switch adapter (``adapters`` by name)."""

    def __init__(self, state) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._state = state

    @property
    def weight(self) -> torch.Tensor:
        return _only(self).weight


# ---- mixed batches ----------------------------------------------------------------------------
def _batch_shape(plan, x2: torch.Tensor) -> tuple[int, int]:
    batch = plan.row_slots.shape[0]
    return batch, x2.shape[0] // batch


def mixed_linear(site: AdaptedLinear, x: torch.Tensor, plan) -> torch.Tensor:
    base = site.base_layer
    x2 = x.reshape(-1, x.shape[-1])
    B, T = _batch_shape(plan, x2)
    adapters, present, plain_lora = _slot_memo(site, plan, _linear_slots)
    if plain_lora and not torch.is_grad_enabled() and not site.training:
        stacks = _stacked_lora(site, plan.slot_names, adapters)
        state = site._state
        if decode_graphs.step_applies(x2, state):
            # Serving step: frozen GEMM + deltas replayed as the graph of a padded token bucket.
            n = x2.shape[0]
            xp, tok = _padded_step_inputs(state, x2)
            y = decode_graphs.graphed(site, lambda t: _lora_slots(site, t, stacks, tok), (xp,),
                                      (base.weight, base.bias, *stacks, tok))[:n]
        elif decode_graphs.applies(x2, state):
            # Eager decode step: frozen GEMM + every adapter's delta replayed as one CUDA graph; the
            # graph reads the tokens' slots from the state's fixed-address buffer (one copy per forward).
            tok = state.static_token_slots(B, T)
            y = decode_graphs.graphed(site, lambda t: _lora_slots(site, t, stacks, tok), (x2,),
                                      (base.weight, base.bias, *stacks, tok))
        else:
            y = _lora_slots(site, x2, stacks, plan.token_slots(B, T), plan)
        return y.view(*x.shape[:-1], y.shape[-1])
    if plain_lora and gathered_mixed_training():
        y = _lora_slots_train(site, x2, adapters, plan, B, T)  # training: differentiable, gathered
        return y.view(*x.shape[:-1], y.shape[-1])
    y = F.linear(x, base.weight, base.bias)
    if not present:
        return y
    y2 = y.view(-1, y.shape[-1])
    for slot, a in enumerate(adapters):  # the eager reference (and LoRA-Switch / block-diagonal rows)
        if a is None:
            continue
        rows = plan.rows_of(slot, B, T)
        if rows.numel():
            y2.index_add_(0, rows, a.delta_rows(site, x2[rows], slot).to(y2.dtype))
    return y


def _padded_step_inputs(state, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A serving step's (N, D) input padded with zero rows to its graph bucket, and the plan's
    per-token slots padded alike in a fixed buffer (``decode_graphs.step_applies``)."""
    n = x2.shape[0]
    n_pad = decode_graphs.bucket(n)
    xp = x2 if n_pad == n else F.pad(x2, (0, 0, 0, n_pad - n))
    return xp, state.padded_token_slots(n_pad)


def _linear_slots(site, names) -> tuple:
    adapters = [_private.module_dict_get(site.adapters, n) for n in names]
    present = [a for a in adapters if a is not None]
    # len(), not bool(list): dynamo in torch 2.11 cannot trace bool() of a list, and that graph
    # break split the compiled decode step per layer (H200: 32-layer mixed batch at 2.66x base)
    plain_lora = len(present) > 0 and all(a.kind == "lora" and not a.merged for a in present)
    return adapters, present, plain_lora


def _slot_memo(site, plan, compute) -> tuple:
    """``compute(site, plan.slot_names)``: the site's adapters of the plan's slots and what the
    forward decides from them, O(slots) Python per site. A plan with an ``epoch`` (the serving
    engine's: its registry changes the model's adapters only between steps, and a new epoch each
    time) reuses the site's last result for the same slot names and epoch, and for a later epoch
    when its log (``BatchPlan.changes_since``) says none of these slots was added or dropped since
    (a slot whose tensors were written keeps its modules): with 32 resident slots that lookup and
    the stacks' staleness check (``_cached_per_site``) were ~150 us of Python per adapted linear
    and step (CPU), ~35 ms per step of a 32-layer model. Any other plan computes."""
    epoch = plan.epoch
    if epoch is None or torch.compiler.is_compiling():
        return compute(site, plan.slot_names)
    memo = site.__dict__.get("_slots_memo")
    if memo is not None and memo[0] == plan.slot_names:
        if memo[1] == epoch:
            return memo[2]
        ch = plan.changes_since(memo[1])
        if ch is not None and ch[1].isdisjoint(plan.slot_names):
            site.__dict__["_slots_memo"] = (plan.slot_names, epoch, memo[2])
            return memo[2]
    out = compute(site, plan.slot_names)
    site.__dict__["_slots_memo"] = (plan.slot_names, epoch, out)
    return out


def _lora_slots(site, x2: torch.Tensor, stacks, tok: torch.Tensor, plan=None) -> torch.Tensor:
    """Frozen GEMM + each token's adapter delta through ONE gathered shrink/expand; with the
    ``plan`` of ``tok``, the kernel's slot order (its "segment" path: prefill over many stack
    positions) is sorted once per plan, not once per linear."""
    from .experts import _gathered_lora, gathered_segments

    a_stack, b_stack, scal = stacks
    base = site.base_layer
    w = scal[tok].view(-1, 1)  # each token's adapter scale; 0 for tokens without an adapter here
    if torch.compiler.is_compiling() and a_stack.dtype == x2.dtype and decode_kernels_apply(x2, site):
        # Compiled decode (HF's static-cache generate): the slots' deltas as the same custom op the
        # single-adapter step uses (moelora_kernels.ops: one opaque node, run beside the frozen GEMM),
        # each token's slot as its "expert". Traced, the torch gather below became a fused kernel
        # per linear for Inductor to compile (H200: the 32-layer mixed step had not finished
        # compiling in 150 s, the single-adapter one took ~47 s).
        from moelora_kernels import ops

        return ops.linear_with_lora(x2, base.weight, base.bias, a_stack, b_stack, tok.view(-1, 1), w.float(), 1.0)
    y = F.linear(x2, base.weight, base.bias)
    idx = tok.view(-1, 1)
    segs = None if plan is None else gathered_segments(x2, a_stack, idx, plan)
    delta = _gathered_lora(x2.to(a_stack.dtype), a_stack, b_stack, idx, weight=w, scaling=1.0, segments=segs)
    return y + delta.to(y.dtype)


def _lora_slots_train(site, x2: torch.Tensor, adapters, plan, B: int, T: int) -> torch.Tensor:
    """The training form of ``_lora_slots``: the tokens gathered by adapter into (P, n, in)
    (``BatchPlan.segment_maps``: each adapter's own tokens, padded with a zero row), ONE batched
    shrink GEMM against the adapters' stacked A's and ONE batched expand GEMM against their B's
    (ranks zero-padded to the largest: exact zeros), the deltas gathered back to their tokens.
    Exact, differentiable, no loop over adapters in the math, and no token of one adapter enters
    another adapter's GEMMs, so a job whose activations overflow cannot reach another job's
    gradients through products with zeros. Only the dropout draws go adapter by adapter: each
    draws from its own stream (``AdapterState.dropout``), so its masks do not depend on the others.

    Saved for backward: what a solo LoRA linear saves per token (its input, in the adapter dtype,
    and h), plus index tensors: the deltas go back through a gather (``inv``), not ``index_add_``,
    which would keep the (P, n, out) deltas alive until backward (measured: ~35% of the saved
    activations of a mixed LoRA/MixLoRA step)."""
    state = site._state
    slots = tuple(s for s, a in enumerate(adapters) if a is not None)
    present = [adapters[s] for s in slots]
    mp = plan.segment_maps(B, T, slots)
    sel, counts = mp["sel"], mp["counts"]  # (P, n): the adapters present at this site
    r = max(a.r for a in present)
    # one stack launch each when the ranks agree (the common case); a pad per smaller rank otherwise
    lora_A = torch.stack([a.lora_A if a.r == r else F.pad(a.lora_A, (0, 0, 0, r - a.r)) for a in present])  # (P, R, in)
    lora_B = torch.stack([a.lora_B if a.r == r else F.pad(a.lora_B, (0, r - a.r)) for a in present])  # (P, out, R)
    x_low = _gather_rows(x2, sel, mp["inv"])  # (P, n, in): each adapter's own tokens (pads: a zero row)
    keep, rescale = None, None
    if site.training and any(getattr(a.lora_dropout, "p", 0.0) > 0 for a in present):
        n = x_low.shape[1]
        mult = _stacked_keeps(state, [(a.lora_dropout, plan.slot_names[s], counts[p])
                                      for p, (s, a) in enumerate(zip(slots, present))], mp, x_low.shape[-1], x_low.device)
        if mult is not None:  # every adapter's own mask, applied in ONE multiply (one node in backward)
            keep, rescale = mult  # (P, n, in) bool; each 1/(1-p), folded into the slot scales below
        else:  # an adapter without its own stream: each through its nn.Dropout (the global RNG)
            xs = x_low.to(lora_A.dtype)
            xs = torch.stack([F.pad(adapter_dropout(a.lora_dropout, xs[p, : counts[p]], state, plan.slot_names[s]),
                                    (0, 0, 0, n - counts[p])) for p, (s, a) in enumerate(zip(slots, present))])
            h = torch.bmm(xs, lora_A.transpose(1, 2)) * _slot_scales(site, present, h_dtype=lora_A.dtype)
            return _lora_slots_expand(site, x2, h, lora_B, mp)
    h = _LoraShrink.apply(x_low, keep, lora_A) * _slot_scales(site, present, lora_A.dtype, rescale)  # (P, n, R)
    return _lora_slots_expand(site, x2, h, lora_B, mp)


def _stacked_keeps(state, items, mp: dict, d: int, device) -> tuple[torch.Tensor, tuple] | None:
    """The (P, n, d) bool keep masks of a gathered LoRA site's adapters (``items``: each one's
    dropout module, name and token count, in the slot order of the segment maps ``mp``; rows past
    a count keep everything) and their 1/(1-p) (1 where dropout is off), or None when an adapter
    that drops has no own stream. Each mask is drawn from its adapter's stream exactly as
    ``AdapterState.dropout_keep`` draws it (``dropout_draw``: the adapter's own row lengths), and
    all of them are laid out by ONE gather from their concatenation by ``mp["keep_index"]``
    (built with the plan's other index maps, in their one host-to-device copy), where per adapter
    a ones-padding cat, a reshape and a pad, then a stack, were ~5 launches per adapter and linear."""
    draws, scales = [], []
    for (drop, name, c), rows in zip(items, mp["keep_rows"]):
        p = getattr(drop, "p", 0.0)
        if not drop.training or p == 0.0 or not c:
            scales.append(1.0)
            if rows:  # this adapter's dropout is off at this site: its rows keep everything
                draws.append(_true_row(d, device).expand(rows, d))
            continue
        got = state.dropout_draw(name, (c, d), device, p)
        if got is None:
            return None
        draws.append(got[0].reshape(-1, d))
        scales.append(1.0 / (1.0 - p))
    return torch.cat([*draws, _true_row(d, device)])[mp["keep_index"]], tuple(scales)


_TRUE_ROWS: dict = {}


def _true_row(d: int, device) -> torch.Tensor:
    """A constant (1, d) all-true bool row per width and device (the kept positions' source)."""
    key = (d, str(device))
    t = _TRUE_ROWS.get(key)
    if t is None:
        t = _TRUE_ROWS[key] = torch.ones((1, d), dtype=torch.bool, device=device)
    return t


def _lora_slots_expand(site, x2, h, lora_B, mp) -> torch.Tensor:
    """The expand half of ``_lora_slots_train``: (P, n, R) -> the deltas on their tokens + frozen GEMM."""
    d = torch.bmm(h, lora_B.transpose(1, 2))  # (P, n, out)
    delta = _gather_rows(d.reshape(-1, d.shape[-1]), mp["inv"], mp["sel"].reshape(-1))  # (N, out)
    y = F.linear(x2, site.base_layer.weight, site.base_layer.bias)
    return y + delta.to(y.dtype)


class _RowGather(torch.autograd.Function):
    """``cat([src, zero row])[idx]``, whose backward is the gather by ``inv``, the inverse map
    (``inv[r]``: where row r of src sits in ``idx.reshape(-1)``; ``idx.numel()`` for a row not
    gathered). Valid because every row of src is gathered at most once (the segment maps of a
    plan: each token belongs to one adapter). Autograd's backward of an index is ``index_put``
    with accumulation, a sort-based kernel on CUDA: H200, 7B shape, 8 concurrent jobs, 797 calls
    and 466 ms of a 2.0 s step of device time; this backward is one gather. Eager twin: the plain
    index (test_concurrent_training's gradient checks)."""

    @staticmethod
    def forward(ctx, src, idx, inv):  # noqa: D102
        ctx.save_for_backward(inv)
        ctx.idx_dim = idx.dim()
        return _with_zero_row(src)[idx]

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (inv,) = ctx.saved_tensors
        return _with_zero_row(g.reshape(-1, *g.shape[ctx.idx_dim:]))[inv], None, None


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one zero row appended: what an index past its last row reads."""
    return torch.cat([t, t.new_zeros((1, *t.shape[1:]))])


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``cat([src, zero row])[idx]`` (``_RowGather``'s backward when src needs a gradient)."""
    if torch.is_grad_enabled() and src.requires_grad:
        return _RowGather.apply(src, idx, inv)
    return _with_zero_row(src)[idx]


class _LoraShrink(torch.autograd.Function):
    """h = bmm(x * keep, A^T) for the gathered adapters' tokens x (P, n, in), keep (P, n, in) bool
    dropout masks or None, A (P, R, in); x cast for A as ``lora_input`` casts it (not at all
    under autocast when x already has autocast's dtype). The dropout's 1/(1-p) is the caller's
    (folded into the slot scales, as the solo LoRA folds it into its scaling).

    The same ops as the plain composition (cast, multiply, bmm) and the same backward ops, but it
    saves x in its own dtype and the masks as bools, and recomputes their product in backward:
    the plain form keeps the float32 copy of the inputs (fp32 adapter weights over bf16
    activations) and the float32 mask, 8 bytes per input element against 3 (2 without dropout
    against 4 for bf16 activations). Eager twin: the plain composition (test_concurrent_training)."""

    @staticmethod
    def _input(x, keep, dtype):
        xs = lora_input(x, dtype)
        return xs if keep is None else xs * keep  # x * bool: exactly x or 0, in x's dtype

    @staticmethod
    def forward(ctx, x, keep, lora_A):  # noqa: D102
        ctx.save_for_backward(x, keep, lora_A)
        # backward runs under the forward's autocast state, so its bmm's cast their operands as
        # autocast cast the forward's (and as autograd's backward of the autocast bmm computes)
        ctx.dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.dev), torch.get_autocast_dtype(ctx.dev))
        return torch.bmm(_LoraShrink._input(x, keep, lora_A.dtype), lora_A.transpose(1, 2))

    @staticmethod
    def backward(ctx, gh):  # noqa: D102
        x, keep, lora_A = ctx.saved_tensors
        gx = gA = None
        with torch.autocast(ctx.dev, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            if ctx.needs_input_grad[2]:
                xs = _LoraShrink._input(x, keep, lora_A.dtype)
                gA = xs.transpose(1, 2).bmm(gh).transpose(1, 2)  # what autograd's bmm backward computes
            if ctx.needs_input_grad[0]:
                g = gh.bmm(lora_A)
        if gA is not None:
            gA = gA.to(lora_A.dtype)
        if ctx.needs_input_grad[0]:
            gx = (g if keep is None else g * keep).to(x.dtype)
        return gx, None, gA


_SCALES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _slot_scales(site, present, h_dtype: torch.dtype, rescale: tuple | None = None) -> torch.Tensor:
    """(P, 1, 1) LoRA scale of each adapter present (times its dropout's 1/(1-p) where ``rescale``
    gives them), kept per site for the last composition (a constant: built per forward it would be
    a host-to-device copy per linear)."""
    values = tuple(a.scaling * (1.0 if rescale is None else rescale[p]) for p, a in enumerate(present))
    key = (values, h_dtype, present[0].lora_A.device)
    hit = _SCALES.get(site)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = torch.tensor(values, dtype=h_dtype, device=key[2]).view(-1, 1, 1)
    _SCALES[site] = (key, out)
    return out


def _cached_per_site(site, names, tensors, build, update=None):
    """``build()`` for this site and batch composition: cached for the last composition in
    ``site.batch_stacks`` (not a buffer: no state_dict side effects) and checked at every use
    against each tensor's identity, storage and in-place version, so training, loading,
    replacing or moving (``.to()``) an adapter rebuilds it. ``tensors(i)``: the tensors the stacks
    are built from at position ``i`` of ``names``.

    ``update(stacks, positions)``: writes the rows of those positions in place and returns True,
    or returns False (nothing written) when they do not fit the stacks' shapes. Used when a few
    positions changed (another adapter, or one slot's tensors copied over: the serving engine's
    swap), outside autograd: a full build copies every position's tensors again (CPU count, 32
    layers, 16 positions: ~22k aten ops more in the forward after a one-position change, against
    ~18k for the whole forward), the update a handful of copies per changed position.

    Under torch.compile inside ``model.generate`` (``generation_names`` set), the compiled decode
    steps read the entry that the same call's eager prefill checked and refreshed, as a static
    input: building the stacks in the graph put ~16 pad/stack nodes per linear into the decode
    step (CPU trace: mixed graph 1169 nodes vs 313 single-adapter at 2 layers; H200: the 32-layer
    mixed step took 3.5x the single-adapter step's compile, over 150 s) and re-copied every
    adapter at every step. Compiled forwards outside ``generate`` have no such prefill, so they
    build in the graph (correct, slower). An attribute of the site, not a module-level weak
    dictionary: dynamo guarded such a dictionary's length (torch 2.11), so any other model freed
    would have recompiled the step."""
    hit = site.batch_stacks
    if torch.compiler.is_compiling():
        fresh = site._state.generation_names is not None and hit is not None and hit[0] == names
        return hit[2] if fresh else build()
    # the serving engine's plans carry an epoch (``_slot_memo``): the stacks checked in this epoch
    # are not checked again (no adapter tensor changes within one), and at a later epoch only the
    # positions of adapters its log says changed since; any other forward checks every position
    state = site._state
    plan = state.plan if state.in_forward else None
    epoch = None if plan is None else plan.epoch
    if hit is not None and len(hit[0]) == len(names):
        if epoch is not None and hit[0] == names and hit[3] == epoch:
            return hit[2]
        stamps = list(hit[1])
        touched = plan.touched_positions(hit[3]) if epoch is not None and hit[0] == names else None
        if touched is not None:  # the same composition: only the positions the log names
            changed = [i for i in touched if not _private.stamps_match(stamps[i], tensors(i))]
        else:
            changed = [i for i, (was, now) in enumerate(zip(hit[0], names))
                       if was != now or not _private.stamps_match(stamps[i], tensors(i))]
        if not changed:
            if epoch is not None:
                site.batch_stacks = (*hit[:3], epoch)
            return hit[2]
        # in place only outside autograd (the stacks are inputs of no graph) and when it is the
        # cheaper way: a few positions of many
        # a few positions of many; or always when the plan has StackBounds (the stacks were built at
        # its sizes, and the serving step's graphs read them at their addresses)
        if update is not None and not torch.is_grad_enabled() and (
                2 * len(changed) <= len(names) or (plan is not None and plan.bounds is not None)):
            with torch.no_grad():
                done = update(hit[2], changed)
            if done:
                for i in changed:
                    stamps[i] = _private.version_stamps(tensors(i))
                site.batch_stacks = (names, stamps, hit[2], epoch)
                return hit[2]
    site.batch_stacks = None  # the old stacks are garbage before the new ones are built
    out = build()
    _private.mark_static_inputs(out)
    site.batch_stacks = (names, [_private.version_stamps(tensors(i)) for i in range(len(names))], out, epoch)
    return out


def _stacked_lora(site, names, adapters):
    """(A (S, R, in), B (S, out, R), scale (S,)) of the batch's adapters at this site, zero where
    an adapter does not target it, ranks zero-padded to the largest (exact zeros); cached by
    ``_cached_per_site``, rows of changed positions rewritten in place (``_update_lora_rows``)."""
    def build():
        present = [a for a in adapters if a is not None]
        bounds = _plan_bounds(site)
        r = max([a.r for a in present] + ([bounds.rank] if bounds is not None else []))
        ref = present[0].lora_A
        a_rows, b_rows = [], []
        for a in adapters:
            if a is None:
                a_rows.append(ref.new_zeros(r, site.in_features))
                b_rows.append(ref.new_zeros(site.out_features, r))
            else:
                a_rows.append(F.pad(a.lora_A.detach(), (0, 0, 0, r - a.r)))
                b_rows.append(F.pad(a.lora_B.detach(), (0, r - a.r)))
        # new_full, not torch.tensor(list): under torch.compile the latter is a CPU constant, which
        # keeps Inductor from CUDA-graphing the decode step (see AdapterState._row_slot_tensor).
        scal = torch.stack([ref.new_full((), 0.0 if a is None else a.scaling) for a in adapters])
        return torch.stack(a_rows), torch.stack(b_rows), scal

    return _cached_per_site(site, names, lambda i: [] if adapters[i] is None else [adapters[i].lora_A, adapters[i].lora_B],
                            build, lambda stacks, positions: _update_lora_rows(stacks, adapters, positions))


def _plan_bounds(site):
    """The current forward's ``StackBounds`` (``BatchPlan.bounds``), or None."""
    state = site._state
    return state.plan.bounds if state.in_forward else None


def _fits_rows(t: torch.Tensor, stack: torch.Tensor, rank_dim: int, r: int) -> bool:
    """``t`` (one adapter's (r, in) A or (out, r) B; experts in front for MixLoRA) can be written
    into a row of ``stack``: the same dtype and device (a ``.to()`` / ``.double()`` of the model
    changes both: then the stacks are built afresh), rank within the stack's, other sizes equal."""
    if t.dtype != stack.dtype or t.device != stack.device or r > stack.shape[rank_dim]:
        return False
    other = [d for d in range(1, stack.dim()) if d != rank_dim]
    off = stack.dim() - t.dim()  # t lacks the stack's leading position/expert dimension
    return all(t.shape[d - off] == stack.shape[d] for d in other if d - off >= 0)


def _update_lora_rows(stacks, adapters, positions) -> bool:
    """Rewrite the rows of ``positions`` of ``_stacked_lora``'s stacks from ``adapters`` (zero
    rows for None); False, writing nothing, when one of them does not fit (``_fits_rows``: a
    larger rank, other sizes, dtype or device; a smaller rank is zero-padded, as a build pads it)."""
    A, B, scal = stacks
    for a in (adapters[i] for i in positions):
        if a is not None and not (_fits_rows(a.lora_A, A, 1, a.r) and _fits_rows(a.lora_B, B, 2, a.r)):
            return False
    for i in positions:
        a = adapters[i]
        if a is None:
            A[i].zero_()
            B[i].zero_()
            scal[i] = 0.0
            continue
        A[i, : a.r].copy_(a.lora_A)
        B[i, :, : a.r].copy_(a.lora_B)
        if a.r < A.shape[1]:
            A[i, a.r:].zero_()
            B[i, :, a.r:].zero_()
        scal[i] = a.scaling
    return True


def mixed_ffn(ffn: AdaptedFFN, hidden: torch.Tensor, plan) -> torch.Tensor:
    """The frozen projections once for all tokens (their LoRA adapters add to their own tokens),
    each MixLoRA adapter's experts on its tokens, then ONE down projection (linearity of W2).

    At inference with top-k routers, all MixLoRA adapters of the batch run as ONE mixture over
    virtual experts (slot × E_max + expert; see ``_virtual_experts``): no loop over adapters.
    Training with top-k routers too (the stacks then built differentiably, each forward).
    Otherwise (top-p / switch routing, router jitter in training, or inside
    ``dispatch.eager_mixed_batches``) the loop over the batch's adapters below, the reference the
    virtual-expert path is tested against."""
    adapters, present, all_topk = _slot_memo(ffn, plan, _ffn_slots)
    if len(present) == 0:
        return ffn.base_layer(hidden)
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    B, T = _batch_shape(plan, x)
    state = ffn._state
    mask = state.token_mask_for(B, T)
    inference = not torch.is_grad_enabled() and not ffn.training
    if inference and all_topk and mask is None and decode_graphs.step_applies(x, state):
        y = _graphed_step_ffn(ffn, x, adapters, plan)
        if y is not None:
            return y.view(shape)
    base_pre = {role: ffn._proj(role)(x) for role in ffn._in_roles()}
    # Training takes the virtual experts too (differentiable stacks), except with router jitter,
    # whose noise the loop draws per adapter.
    virtual = all_topk and (inference or (
        gathered_mixed_training() and not (ffn.training and any(a.router.jitter_noise > 0 for a in present))))
    if virtual:
        h_mix, down_delta = _virtual_experts(ffn, x, base_pre, adapters, plan, B, T, mask, train=not inference)
    else:
        h_mix = ffn._activate(base_pre)  # the plain FFN hidden for tokens without a MixLoRA adapter here
        down_delta = None
        for slot, a in enumerate(adapters):
            if a is None:
                continue
            rows = plan.rows_of(slot, B, T)
            if rows.numel() == 0:
                continue
            m = None if mask is None else mask[rows]
            routing = a.router(x[rows], m)
            state.record(a.adapter_name, ffn.layer_idx, routing, m, a.num_experts)
            hm, dd = a.mix_hidden(ffn, x[rows], {r: v[rows] for r, v in base_pre.items()}, routing)
            h_mix = h_mix.index_copy(0, rows, hm.to(h_mix.dtype))
            if dd is not None:
                if down_delta is None:
                    down_delta = torch.zeros(x.shape[0], dd.shape[-1], dtype=dd.dtype, device=dd.device)
                down_delta = down_delta.index_copy(0, rows, dd)
    y = ffn._proj("down")(h_mix)
    if down_delta is not None:
        y = y + down_delta.to(y.dtype)
    return y.view(shape)


def _graphed_step_ffn(ffn, x: torch.Tensor, adapters, plan) -> torch.Tensor | None:
    """A serving step's whole mixed FFN (its projections' LoRA deltas, the virtual-expert
    mixture, the down projection) as the CUDA graph of a padded token bucket
    (``decode_graphs.step_applies``), or None when a projection is not graphable (a LoRA-Switch
    or merged adapter on it: the eager rows). The projections run here on the padded tokens,
    not through their own forward (which reads the unpadded plan). The routing records are made
    from the graph's outputs after the replay, for the step's real tokens."""
    state = ffn._state
    projs = {}
    for role in (*ffn._in_roles(), "down"):
        p = ffn._proj(role)
        if isinstance(p, AdaptedLinear):
            lin_adapters, present, plain = _slot_memo(p, plan, _linear_slots)
            if present and not plain:
                return None
            projs[role] = (p.base_layer, p, _stacked_lora(p, plan.slot_names, lin_adapters) if present else None)
        else:
            projs[role] = (p, None, None)
    st = _moe_stacks(ffn, plan.slot_names, adapters)
    n = x.shape[0]
    xp, tok = _padded_step_inputs(state, x)
    kernel = gathered_kernel_applies(x)

    def proj(role, t):
        base, site, stacks = projs[role]
        return F.linear(t, base.weight, base.bias) if stacks is None else _lora_slots(site, t, stacks, tok)

    def step(t):
        from .experts import _gathered_lora

        base_pre = {role: proj(role, t) for role in ffn._in_roles()}
        w, vid, probs, keep = _virtual_routing(st, t, tok, None, None)
        h_mix, dd = _mixture_math(ffn, t, base_pre, vid, w, st["A"], st["B"],
                                  functools.partial(_gathered_lora, scaling=1.0, kernel=kernel),
                                  lambda role, v, _: v, None)
        y = proj("down", h_mix)
        if dd is not None:
            y = y + dd.to(y.dtype)
        return y, w, vid, probs, keep

    params = [tok, kernel, st["emax"], st["K"], *_tensors_of(st)]
    for base, _, stacks in projs.values():
        params += [base.weight, base.bias, *(stacks or ())]
    y, w, vid, probs, keep = decode_graphs.graphed(ffn, step, (xp,), params)
    if lazy_routing_records():
        _record_lazily(ffn, adapters, st, (w[:n], vid[:n], probs[:n], keep[:n], tok[:n], None))
    else:
        _record_mixture(ffn, adapters, st, w[:n], vid[:n], probs[:n], keep[:n], tok[:n], None)
    return y[:n]


def _tensors_of(tree) -> list:
    """Every tensor in a (nested) dict / list / tuple of stacks, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors_of(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors_of(v)]
    return []


def stacked_adapter_bytes(model) -> int:
    """Bytes of the stacked adapters the adapted modules of ``model`` hold now (their
    ``batch_stacks``' stacks, not the stamps, which refer to the slots' own tensors), each storage once."""
    storages = {}
    for m in model.modules():
        if isinstance(m, (AdaptedLinear, AdaptedFFN)) and m.batch_stacks is not None:
            for t in _tensors_of(m.batch_stacks[2]):
                storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(storages.values())


def _ffn_slots(ffn, names) -> tuple:
    adapters = [_private.module_dict_get(ffn.adapters, n) for n in names]
    present = [a for a in adapters if a is not None]
    return adapters, present, all(a.strategy == "topk" for a in present)


def _virtual_experts(ffn, x, base_pre, adapters, plan, B, T, mask, train: bool = False):
    """Every MixLoRA adapter of the batch as one mixture: their routers stacked into one
    (S·E_max, D) matrix, each token's softmax/top-k restricted to its own adapter's columns
    (the others masked to -inf: the softmax over its own experts, exactly), and the expert
    stacks indexed by virtual id slot·E_max + e. Scales are folded into B.

    Inference: over all tokens of the batch; tokens of the base or of plain-LoRA adapters get one
    slot on a zero expert with weight 1 (the plain FFN hidden), and the stacks are cached.
    Training: over the sub-batch of the MixLoRA adapters' own tokens only (``segment_maps``), with
    stacks of the live parameters of the adapters present; the other tokens get the plain FFN
    hidden, and everything goes back in place by one gather. Why: over all tokens, every token of a
    plain-LoRA job would carry K expert slots of (K, F) intermediates (kept for backward, the
    down experts' input in the adapter dtype) and every stack S·E_max+1 experts, so the saved
    activations grew faster than the jobs (measured: 1.6x the jobs' own at 2-8 jobs)."""
    if not train:
        tok = plan.token_slots(B, T)
        st = _moe_stacks(ffn, plan.slot_names, adapters)
        return _mixture(ffn, x, base_pre, adapters, tok, mask, st, None, plan._maps)
    slots = tuple(s for s, a in enumerate(adapters) if a is not None)
    present = [adapters[s] for s in slots]
    mp = plan.segment_maps(B, T, slots)
    rows, rows_inv = mp["rows"], mp["rows_inv"]
    sub_pre = {role: _gather_rows(v, rows, rows_inv) for role, v in base_pre.items()}
    sub_mask = _sub_mask(mp, mask, rows)
    st = _train_moe_stacks(ffn, present)
    h_m, dd_m = _mixture(ffn, _gather_rows(x, rows, rows_inv), sub_pre, present, mp["tok"], sub_mask, st, mp)
    order, perm = mp["order"], mp["perm"]  # a permutation and its inverse
    if mp["n_other"]:
        other = mp["other"]
        h_other = ffn._activate({role: _gather_rows(v, other, mp["other_inv"]) for role, v in base_pre.items()})
        h_mix = _gather_rows(torch.cat([h_m, h_other.to(h_m.dtype)]), order, perm)
    else:
        h_mix = _gather_rows(h_m, order, perm)
    down_delta = None
    if dd_m is not None:
        dd = dd_m if not mp["n_other"] else torch.cat([dd_m, dd_m.new_zeros(mp["n_other"], dd_m.shape[-1])])
        down_delta = _gather_rows(dd, order, perm)
    return h_mix, down_delta


def _sub_mask(mp: dict, mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """``mask[rows]``, the MixLoRA sub-batch's token mask, made once per forward (kept in the
    plan's segment maps beside ``rows``): one index launch, not one per layer, and every layer's
    routing record holds the same mask, so the aux loss takes all layers at once
    (``hooks._stacked_terms``)."""
    if mask is None:
        return None
    hit = mp.get("sub_mask")
    if hit is None or hit[0] is not mask:
        hit = mp["sub_mask"] = (mask, mask[rows])
    return hit[1]


def _routing_masks(st, tok, n_cols: int, cache) -> tuple:
    """What the virtual-expert routing of ``_mixture`` derives from the tokens' slots alone:
    ``invalid`` (N, S*E_max) the columns outside each token's own adapter's experts (tokens without
    a MixLoRA adapter here: all but column 0, a finite softmax whose weights are reset), ``keep``
    (N, K) the slots within its adapter's top-k, ``has`` (N, 1) whether it has one, ``first`` (N, K)
    float32 weight 1 on slot 0 (the plain FFN hidden for the others), ``has_keep``. ``cache``: the
    plan's per-forward dict (inference), shared by every FFN whose stacks have the same
    (experts, top-k) per slot (``st["sig"]``): built once per forward, ~20 ops, not per layer."""
    key = None
    if cache is not None and st.get("sig") is not None and not torch.compiler.is_compiling():
        key = ("routing_masks", st["sig"], st["emax"], st["K"], n_cols, tok.shape[0])
        hit = cache.get(key)
        if hit is not None and hit[0] is tok:
            return hit[1]
    emax, K = st["emax"], st["K"]
    e_tok, k_tok = st["E"][tok], st["k"][tok]  # (N,): 0 for tokens without a MixLoRA adapter here
    has = e_tok > 0
    col = torch.arange(n_cols, device=tok.device)
    valid = ((col // emax)[None] == tok[:, None]) & ((col % emax)[None] < e_tok[:, None])
    valid = valid | (~has[:, None] & (col[None] == 0))  # a finite softmax for them; weights reset below
    keep = torch.arange(K, device=tok.device)[None] < k_tok[:, None]
    first = torch.zeros(tok.shape[0], K, dtype=torch.float32, device=tok.device)
    first[:, 0] = 1.0
    has = has[:, None]
    out = (~valid, keep, has, first, has & keep)
    if key is not None:
        cache[key] = (tok, out)
    return out


def _mixture(ffn, x, base_pre, adapters, tok, mask, st, layout, cache=None):
    """The virtual-expert mixture of ``_virtual_experts`` over the tokens x (N, D) whose slot in
    ``adapters`` is ``tok`` (N,). ``layout``: None (inference, all tokens of the batch), or the
    training sub-batch's ``segment_maps`` (every token belongs to an adapter, adapter p's tokens
    are rows offsets[p]:offsets[p]+counts[p])."""
    from .experts import _gathered_lora

    w, vid, probs, keep = _virtual_routing(st, x, tok, mask, cache)
    if layout is None and lazy_routing_records() and not torch.compiler.is_compiling():
        # Inference: each adapter's routing record is made only when read (``router_statistics``),
        # from the mixture's tensors: no ops per adapter in the step (``_record_mixture`` runs five per
        # MixLoRA adapter of the batch at every FFN, ~17 us each on a host-bound GPU step).
        _record_lazily(ffn, adapters, st, (w, vid, probs, keep, tok, mask))
    else:
        _record_mixture(ffn, adapters, st, w, vid, probs, keep, tok, mask, layout)
    if layout is not None and (len(adapters) > 1 or not gathered_kernel_applies(x)):
        # Training: each adapter's tokens against its own experts only, batched over the adapters
        # (linear in their number). Without the Triton kernel the torch reference would compute
        # every adapter's experts for every token; with it, a stack of 2+ adapters (P·E_max+1
        # experts) is too wide for the kernel's tile path (E_pad·R_pad > 256: the per-slot gather
        # kernels run instead) and its backward multiplies a one-hot (tokens, P·E_max·R_pad)
        # matrix with the tokens' inputs: FLOPs ∝ tokens × P, quadratic in the jobs (about
        # 5.6 TFLOP a step at 8 jobs of SmolLM2's shape, 8k tokens, before the sub-batch). One
        # adapter (a solo job's stack) keeps the kernel.
        expert_lora = functools.partial(_segmented_expert_lora, seg=(layout, st["emax"]))
    else:  # the kernel choice fixed here: a backward that recomputes the mixture takes the forward's
        from .experts import one_routing_lora

        # gate, up and down share the routing vid: the kernel's slot order sorted once per FFN
        expert_lora = one_routing_lora(gathered_kernel_applies(x))
    in_roles = ffn._in_roles()
    e_roles = [r for r in (*in_roles, "down") if r in st["A"]]
    if layout is None or not recompute_applies() or not _own_streams(ffn, adapters, e_roles):
        # inference, or a dropping adapter without its own stream (its nn.Dropout draws from
        # torch's global RNG as it goes): the plain composition, autograd saves its (N, K, F) tensors
        def drop(role, t, _):
            return _expert_dropout(ffn, t, adapters, layout, role)

        return _mixture_math(ffn, x, base_pre, vid, w, st["A"], st["B"], expert_lora, drop, None)
    # Training: the mixture recomputed in backward (_MixRecompute, as a MixLoRA adapter's own fused
    # path): saved are x, the frozen pre-activations, vid/w, the stacks and the dropout masks as
    # bools, drawn here in the order the plain composition draws them (role by role, adapter by
    # adapter, each from its own stream), not its (N, K, F) pre-activations, hiddens and inputs.
    K, n_hidden = vid.shape[1], ffn._proj("down").in_features
    h_dtype = base_pre[in_roles[0]].dtype  # the hidden's dtype (frozen pre-activations, activated)
    keeps = []
    for role in e_roles:
        shape, dtype = ((x.shape[0], x.shape[1]), x.dtype) if role != "down" else ((x.shape[0], K, n_hidden), h_dtype)
        keeps += _expert_keep(ffn, shape, x.new_empty(0, dtype=dtype), adapters, layout, role)
    bases = [base_pre[r] for r in in_roles]
    stacks = [t for r in e_roles for t in (st["A"][r], st["B"][r])]
    nb, ns = len(bases), len(stacks)

    def run(x, vid, w, *rest):
        stk = dict(zip(e_roles, zip(rest[nb:nb + ns:2], rest[nb + 1:nb + ns:2])))
        kp = dict(zip(e_roles, zip(rest[nb + ns::3], rest[nb + ns + 1::3], rest[nb + ns + 2::3])))

        def drop(role, t, like):
            return _apply_keep(t, *kp[role], like)

        return _mixture_math(ffn, x, dict(zip(in_roles, rest[:nb])), vid, w, {r: a for r, (a, _) in stk.items()},
                             {r: b for r, (_, b) in stk.items()}, expert_lora, drop, h_dtype)

    h_mix, down_delta = _MixRecompute.apply(run, x, vid, w, *bases, *stacks, *keeps)
    return h_mix, (down_delta if "down" in st["A"] else None)


def _virtual_routing(st, x, tok, mask, cache) -> tuple:
    """(w, vid, probs, keep) of the virtual-expert routing of ``_mixture`` for tokens x of slots tok."""
    n_cols = st["router"].shape[0]
    logits = F.linear(x.float(), st["router"])  # (N, S*Emax)
    invalid, keep, has, first, has_keep = _routing_masks(st, tok, n_cols, cache)
    probs = torch.softmax(logits.masked_fill(invalid, float("-inf")), dim=-1)
    w, vid = torch.topk(probs, st["K"], dim=-1)  # (N, K)
    w = torch.where(keep, w, 0.0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    w = torch.where(has, w, first)
    vid = torch.where(has_keep, vid, n_cols)  # n_cols: the zero expert
    return w, vid, probs, keep


def _record_lazily(ffn, adapters, st, src: tuple) -> None:
    """Each MixLoRA adapter's routing record of an inference mixture, as a ``_MixtureRecord``
    computed on first read from ``src`` = (w, vid, probs, keep, tok, mask)."""
    for s, a in enumerate(adapters):
        if a is not None:
            ffn._state.record_entry(a.adapter_name, _MixtureRecord(ffn.layer_idx, s, st["emax"], a.num_experts, src))


def _record_mixture(ffn, adapters, st, w, vid, probs, keep, tok, mask, layout=None) -> None:
    """Each MixLoRA adapter's routing record of a virtual-expert mixture, made now (training, or
    ``eager_routing_records``)."""
    from .router import Routing

    state = ffn._state
    for s, a in enumerate(adapters):
        if a is None:
            continue
        base = s * st["emax"]
        if layout is None:
            own = tok == s if mask is None else (tok == s) & mask
            # slots past this adapter's own top-k (K is the batch's largest) are not "routed" (f_e)
            routing = Routing(w, (vid - base).clamp(0, a.num_experts - 1), probs[:, base: base + a.num_experts], keep)
        else:  # the adapter's own rows, views (what the eager loop records)
            o, c = layout["offsets"][s], layout["counts"][s]
            own = None if mask is None else mask[o: o + c]
            routing = Routing(w[o: o + c], (vid[o: o + c] - base).clamp(0, a.num_experts - 1),
                              probs[o: o + c, base: base + a.num_experts], keep[o: o + c])
        state.record(a.adapter_name, ffn.layer_idx, routing, own, a.num_experts)


class _MixtureRecord:
    """A ``LayerRouting`` of one adapter of an inference mixture (``_mixture``), computed on first
    read from the mixture's tensors (w, vid, probs, keep: (N, K) / (N, S*E_max); tok (N,); mask):
    the values the per-adapter loop records. Those tensors are not written after the mixture."""

    __slots__ = ("layer", "num_experts", "_slot", "_emax", "_src", "_done")

    def __init__(self, layer: int, slot: int, emax: int, num_experts: int, src: tuple) -> None:
        self.layer, self.num_experts, self._slot, self._emax, self._src = layer, num_experts, slot, emax, src
        self._done = None

    def _make(self) -> tuple:
        if self._done is None:
            from .router import Routing

            w, vid, probs, keep, tok, mask = self._src
            s, base, E = self._slot, self._slot * self._emax, self.num_experts
            own = tok == s if mask is None else (tok == s) & mask
            self._done = (Routing(w, (vid - base).clamp(0, E - 1), probs[:, base: base + E], keep), own)
            self._src = None
        return self._done

    @property
    def routing(self):
        return self._make()[0]

    @property
    def token_mask(self):
        return self._make()[1]

    def __deepcopy__(self, memo: dict):
        from ..state import LayerRouting

        return LayerRouting(self.layer, self.routing, self.token_mask, self.num_experts).__deepcopy__(memo)


def _mixture_math(ffn, x, base_pre, vid, w, stacks_a, stacks_b, expert_lora, drop, h_dtype):
    """The expert part of ``_mixture``: the frozen pre-activations plus each (token, slot)'s
    expert deltas, activated, mixed by w (one down projection later), and the down experts'
    delta. ``drop(role, t, like)``: the experts' input dropout (``like``: the dtype the masks
    were drawn in). What ``_MixRecompute`` runs twice in training."""
    pre = {}
    for role in ffn._in_roles():
        b = base_pre[role].unsqueeze(1)  # (N, 1, F)
        if role in stacks_a:
            xr = drop(role, x, x.dtype)
            d = expert_lora(xr, stacks_a[role], stacks_b[role], vid)  # each casts to its compute dtype
            pre[role] = b + d.to(b.dtype)
        else:
            pre[role] = b
    h = ffn._activate(pre)
    if h.shape[1] != vid.shape[1]:
        h = h.expand(-1, vid.shape[1], -1)
    h_mix = (h * w.to(h.dtype).unsqueeze(-1)).sum(1)
    down_delta = None
    if "down" in stacks_a:
        if h_dtype is not None and h.dtype != h_dtype:
            raise RuntimeError(f"down-expert dropout masks drawn in {h_dtype}, the hidden is {h.dtype}")
        hd = drop("down", h, h.dtype)
        down_delta = expert_lora(hd, stacks_a["down"], stacks_b["down"], vid, weight=w)
    return h_mix, down_delta


def _own_streams(ffn, adapters, roles) -> bool:
    """Whether every adapter whose experts drop out (in training) draws from its own stream."""
    if not ffn.training:
        return True
    state = ffn._state
    for a in adapters:
        if any(e is not None and e.lora_dropout.training and getattr(e.lora_dropout, "p", 0.0) > 0
               for e in (a._expert(ffn, r) for r in roles)):
            info = state.adapters.get(a.adapter_name)
            if info is None or info.dropout_generator is None:
                return False
    return True


def _expert_keep(ffn, shape, like, adapters, layout, role: str) -> list:
    """``_expert_dropout``'s masks for an input of ``shape`` (drawn as it draws them, in ``like``'s
    dtype), as [keep (bool, shape), row scales (M, 1[, 1]) float32, past-top-k slots (M, K, 1)
    bool or None], or [None] * 3 where it is the identity. Every dropping adapter has its own
    stream (``_own_streams``)."""
    if not ffn.training or layout is None:
        return [None] * 3
    experts = [a._expert(ffn, role) for a in adapters]
    if not any(e is not None and getattr(e.lora_dropout, "p", 0.0) > 0 for e in experts):
        return [None] * 3
    items, slots_past = [], []
    for p, (a, e) in enumerate(zip(adapters, experts)):
        c = layout["counts"][p]
        k = a.top_k if len(shape) == 3 and shape[1] > a.top_k else None
        items.append((e.lora_dropout if e is not None else torch.nn.Identity(), a.adapter_name,
                      (c, *shape[1:]) if k is None else (c, k, *shape[2:])))
        slots_past.append(k)
    keeps, scales = _dropout_multipliers(ffn._state, items, like)
    keeps = [m if k is None else torch.cat([m, m.new_ones((m.shape[0], shape[1] - k, *m.shape[2:]))], dim=1)
             for m, k in zip(keeps, slots_past)]
    keep = (keeps[0] if len(keeps) == 1 else torch.cat(keeps)).bool()
    past = None
    if any(k is not None for k in slots_past):
        K = shape[1]
        past = torch.cat([(torch.arange(K, device=like.device) >= (K if k is None else k)).expand(c, K)
                          for k, c in zip(slots_past, layout["counts"])]).unsqueeze(-1)
    return [keep, _row_scales(scales, layout["counts"], like.new_empty((0,) * len(shape))), past]


def _apply_keep(t, keep, row_scale, past, like):
    """``t`` through the masks of ``_expert_keep``: the values ``_expert_dropout`` computes."""
    if keep is None:
        return t
    mult = keep.to(like) * row_scale
    if past is not None:
        mult = torch.where(past, torch.ones_like(mult), mult)  # slots past an adapter's top-k: kept as is
    return (t * mult).to(t.dtype)


def _segmented_expert_lora(t: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, vid: torch.Tensor,
                           weight: torch.Tensor | None = None, *, seg) -> torch.Tensor:
    """``gathered_lora_reference``'s math with each MixLoRA adapter's tokens (the training
    sub-batch's ``local_sel``) against its own E_max experts only, batched over the adapters:
    t (N, in) or (N, K, in), stacks (P·E_max+1, R, in) / (P·E_max+1, out, R), vid (N, K) ->
    (N, K, out), or (N, out) summed with ``weight`` (N, K). Linear in the number of adapters (the
    reference is quadratic: every token against every adapter's experts) and no token reaches
    another adapter's experts. The results go back to their tokens by a gather (``local_inv``),
    which saves only its index (``index_add_`` kept the (P, n, K, out) result for backward)."""

    layout, emax = seg
    sel, inv = layout["local_sel"], layout["local_inv"]  # (P, n), (N,)
    P, n = sel.shape
    N, K = vid.shape
    # fp32 math (autocast's dtype where it is on: its einsums would cast fp32 operands back anyway)
    cdt = compute_dtype(t.device.type, torch.promote_types(torch.promote_types(t.dtype, lora_A.dtype), torch.float32))
    A = lora_A[: P * emax].view(P, emax, *lora_A.shape[1:]).to(cdt)  # (P, E, R, in)
    Bm = lora_B[: P * emax].view(P, emax, *lora_B.shape[1:]).to(cdt)  # (P, E, out, R)
    tp = _gather_rows(t, sel, inv).to(cdt)  # (P, n, in) or (P, n, K, in)
    base = _slot_bases(P, emax, vid.device)
    local = torch.cat([vid, vid.new_full((1, K), -1)])[sel] - base  # (P, n, K): <0 or >=E: no expert
    coef = (local.unsqueeze(-1) == torch.arange(emax, device=vid.device)).to(cdt)  # (P, n, K, E)
    if weight is not None:
        coef = coef * _gather_rows(weight, sel, inv).to(cdt).unsqueeze(-1)
    if tp.dim() == 3:
        h = torch.einsum("pni,peri->pner", tp, A).unsqueeze(2)  # (P, n, 1, E, R)
    else:
        h = torch.einsum("pnki,peri->pnker", tp, A)  # (P, n, K, E, R)
    g = h * coef.unsqueeze(-1)  # the rank block of each slot's chosen expert only
    y = torch.einsum("pnker,peor->pno" if weight is not None else "pnker,peor->pnko", g, Bm)
    return _gather_rows(y.reshape(P * n, *y.shape[2:]), inv, sel.reshape(-1)).to(t.dtype)


_BASES: dict = {}


def _slot_bases(P: int, emax: int, device) -> torch.Tensor:
    """(P, 1, 1) first virtual expert of each adapter: a constant, made once per shape and device
    (``torch.tensor`` per call is a host-to-device copy, a wait for the GPU queue, per role and layer)."""
    key = (P, emax, str(device))
    t = _BASES.get(key)
    if t is None:
        t = _BASES[key] = (torch.arange(P, device=device) * emax).view(P, 1, 1)
    return t


def _dropout_multipliers(state, items, like: torch.Tensor) -> tuple[list, torch.Tensor] | None:
    """Per adapter (its dropout module, name, the shape of its part of ``like``): its 0/1 keep
    mask drawn from its own stream as ``AdapterState.dropout`` draws it (ones where its dropout is
    off), and the (P,) float32 scales 1/(1-p) (1 where off), or None when some adapter that drops
    has no own stream (its nn.Dropout then draws from torch's global RNG, one by one). Masks bool,
    on ``like``'s device. The caller multiplies by ``stacked masks * scales``: exactly
    {0, float32(1/(1-p))}, so ``x * that`` rounds as ``x * keep * 1/(1-p)`` in ``dropout``; the
    scales as one cached vector, not one multiply per adapter."""
    keeps, scales = [], []
    for drop, name, shape in items:
        p = getattr(drop, "p", 0.0)
        if not drop.training or p == 0.0 or not shape[0]:
            keeps.append(like.new_ones(shape, dtype=torch.bool))
            scales.append(1.0)
            continue
        keep = state.dropout_keep(name, shape, torch.bool, like.device, p)
        if keep is None:
            return None
        keeps.append(keep)
        scales.append(1.0 / (1.0 - p))
    return keeps, tuple(scales)


def _expert_dropout(ffn, t: torch.Tensor, adapters, layout, role: str) -> torch.Tensor:
    """``t`` (N, D) or (N, K, F), the input of the ``role`` experts over the training sub-batch
    (``layout``: adapter p's rows are offsets[p]:offsets[p]+counts[p]), with each MixLoRA
    adapter's dropout on its own rows, drawn from its own stream in the shape its fused path
    draws alone (``mix_hidden``: (n, D), or (n, k, F) with its own top-k); the identity outside
    training. The adapters' rows are contiguous and cover the sub-batch: their masks are
    concatenated and applied in ONE multiply (one node in backward, not a few per adapter)."""
    if not ffn.training or layout is None:
        return t
    state = ffn._state
    experts = [a._expert(ffn, role) for a in adapters]
    if not any(e is not None and getattr(e.lora_dropout, "p", 0.0) > 0 for e in experts):
        return t
    items, slots_past = [], []
    for p, (a, e) in enumerate(zip(adapters, experts)):
        c = layout["counts"][p]
        k = a.top_k if t.dim() == 3 and t.shape[1] > a.top_k else None  # slots past its top-k have weight 0
        shape = (c, *t.shape[1:]) if k is None else (c, k, *t.shape[2:])
        drop = e.lora_dropout if e is not None else torch.nn.Identity()
        items.append((drop, a.adapter_name, shape))
        slots_past.append(k)
    mult = _dropout_multipliers(state, items, t)
    if mult is None:  # an adapter without its own stream: the loop, each through its nn.Dropout
        parts = []
        for p, ((drop, name, _), k) in enumerate(zip(items, slots_past)):
            o, c = layout["offsets"][p], layout["counts"][p]
            part = t[o: o + c]
            if k is None:
                parts.append(adapter_dropout(drop, part, state, name))
            else:
                parts.append(torch.cat([adapter_dropout(drop, part[:, :k], state, name), part[:, k:]], dim=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    keeps, scales = mult
    keeps = [m.to(t.dtype) for m in keeps]  # (bool draws) -1 marks below
    # slots past an adapter's top-k keep their values (weight 0: its solo path draws no mask there)
    # and its scale (1/(1-p)) applies to its drawn slots only: the scales go on the masks per row
    # range, so they are expanded to the rows here (one repeat_interleave of a cached vector)
    keeps = [m if k is None else torch.cat([m, m.new_full((m.shape[0], t.shape[1] - k, *m.shape[2:]), -1.0)], dim=1)
             for m, k in zip(keeps, slots_past)]
    mask = keeps[0] if len(keeps) == 1 else torch.cat(keeps)
    row_scale = _row_scales(scales, layout["counts"], t)
    mult_all = mask * row_scale
    if any(k is not None for k in slots_past):
        mult_all = torch.where(mask < 0, torch.ones_like(mult_all), mult_all)  # -1: a slot past its top-k
    return (t * mult_all).to(t.dtype)


_SCALE_VECTORS: dict = {}  # _row_scales' constants, bounded


def _row_scales(scales: tuple, counts: list, t: torch.Tensor) -> torch.Tensor:
    """(M, 1[, 1]) float32: adapter p's dropout scale on each of its counts[p] rows; built on the
    host and copied once per composition (cached by value, bounded)."""
    key = ("rows", scales, tuple(counts), t.dim(), str(t.device))
    hit = _SCALE_VECTORS.get(key)
    if hit is None:
        rows = torch.tensor([v for v, c in zip(scales, counts) for _ in range(c)], dtype=torch.float32)
        hit = rows.view(-1, *([1] * (t.dim() - 1))).to(t.device)
        if len(_SCALE_VECTORS) >= 256:
            _SCALE_VECTORS.pop(next(iter(_SCALE_VECTORS)))
        _SCALE_VECTORS[key] = hit
    return hit


_CONSTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _train_moe_stacks(ffn, present) -> dict:
    """The stacks of ``_build_moe_stacks`` for the adapters ``present`` (every slot an adapter),
    differentiable and built with one ``cat`` per tensor: a zeros buffer filled slice by slice
    costs one launch per adapter and role (and one CopySlices node each in backward). The
    constants (experts and top-k per adapter, the scale of each virtual expert) are cached per
    site for the last composition."""
    emax = max(a.num_experts for a in present)
    rmax = max(e.r for a in present for e in a.experts.values())
    dev = ffn._proj("down").weight.device
    roles = [r for r in ("gate", "up", "gate_up", "down") if r in ffn.proj_names]
    key = (tuple((a.num_experts, a.top_k, tuple(None if a._expert(ffn, r) is None else a._expert(ffn, r).scaling
                                                for r in roles)) for a in present), emax, str(dev))
    hit = _CONSTS.get(ffn)
    if hit is None or hit[0] != key:
        E = torch.tensor([a.num_experts for a in present], dtype=torch.long, device=dev)
        k = torch.tensor([a.top_k for a in present], dtype=torch.long, device=dev)
        scales = {}
        for role in roles:
            experts = [a._expert(ffn, role) for a in present]
            if any(e is None for e in experts):
                continue
            sc = [e.scaling for e in experts for _ in range(emax)] + [0.0]
            scales[role] = torch.tensor(sc, dtype=torch.float32, device=dev).view(-1, 1, 1)
        hit = (key, E, k, scales)
        _CONSTS[ffn] = hit
    _, E, k, scales = hit

    def pad_e(t: torch.Tensor, n: int) -> torch.Tensor:  # (n, ...) -> (emax, ...), zero experts added
        return t if n == emax else torch.cat([t, t.new_zeros(emax - n, *t.shape[1:])])

    router = torch.cat([pad_e(a.router.weight.float(), a.num_experts) for a in present])
    stacks_a, stacks_b = {}, {}
    for role in roles:
        experts = [a._expert(ffn, role) for a in present]
        if role not in scales:
            if any(e is not None for e in experts):  # some adapters have experts here, some not
                return _build_moe_stacks(ffn, present, present, differentiable=True)
            continue
        ref = experts[0]
        dt_a, dt_b = ref.lora_A.dtype, ref.lora_B.dtype
        a_parts = [pad_e(F.pad(e.A(), (0, 0, 0, rmax - e.r)) if e.r != rmax else e.A(), e.num_experts).to(dt_a)
                   for e in experts]
        b_parts = [pad_e(F.pad(e.B(), (0, rmax - e.r)) if e.r != rmax else e.B(), e.num_experts).float()
                   for e in experts]
        A = torch.cat(a_parts + [a_parts[0].new_zeros(1, *a_parts[0].shape[1:])])  # +1: the zero expert
        Bm = torch.cat(b_parts + [b_parts[0].new_zeros(1, *b_parts[0].shape[1:])])
        stacks_a[role], stacks_b[role] = A, (Bm * scales[role]).to(dt_b)
    return {"router": router, "E": E, "k": k, "K": int(max(a.top_k for a in present)), "emax": emax,
            "A": stacks_a, "B": stacks_b}


def _moe_stacks(ffn, names, adapters) -> dict:
    """The batch's MixLoRA adapters of this FFN stacked by virtual expert (cached by
    ``_cached_per_site``; block-diagonal experts are made dense here, once per composition;
    changed positions rewritten in place by ``_update_moe_rows``)."""
    present = [a for a in adapters if a is not None]

    def tensors(i):
        a = adapters[i]
        return [] if a is None else [a.router.weight] + [p for e in a.experts.values() for p in (e.lora_A, e.lora_B)]
    return _cached_per_site(ffn, names, tensors, lambda: _build_moe_stacks(ffn, adapters, present),
                            lambda st, positions: _update_moe_rows(ffn, st, adapters, present, positions))


def _update_moe_rows(ffn, st: dict, adapters, present, positions) -> bool:
    """Rewrite the virtual experts of ``positions`` in ``_build_moe_stacks``' stacks (router rows,
    experts count, top-k, expert A/B with B scaled, zeros beyond an adapter's experts and rank).
    False, writing nothing, unless the stacks' structure holds for the new composition: every
    adapter fits ``emax`` experts and ``rmax`` ranks, the same roles have experts, the same
    largest top-k (``K``: the mixture's slots per token; with ``StackBounds`` at most ``K``: the
    extra slots of a smaller top-k carry weight 0 on the zero expert)."""
    if not present:
        return False
    k_max = max(a.top_k for a in present)
    if k_max > st["K"] or (k_max != st["K"] and not st.get("bounded")):
        return False
    emax = st["emax"]
    covered = st["router"].shape[0] // emax  # positions the expert stacks hold (_moe_positions)
    for i in positions:
        a = adapters[i]
        if a is None:
            continue
        if i >= covered:
            return False
        w = a.router.weight
        if a.num_experts > emax or w.shape[1] != st["router"].shape[1] or w.device != st["router"].device:
            return False
        for role in ("gate", "up", "gate_up", "down"):
            e = a._expert(ffn, role) if role in ffn.proj_names else None
            if e is not None and role not in st["A"]:  # a role no stack has yet: built afresh
                return False
            if e is not None and not (_fits_rows(e.A(), st["A"][role], 1, e.r)  # dense (block-diagonal too)
                                      and _fits_rows(e.B(), st["B"][role], 2, e.r)):
                return False
    sig = list(st["sig"])
    for i in positions:
        a = adapters[i]
        if a is None:
            st["E"][i], st["k"][i] = 0, 0
            sig[i] = None
        if i >= covered:
            continue
        rows = slice(i * emax, (i + 1) * emax)
        st["router"][rows].zero_()
        for role in st["A"]:
            st["A"][role][rows].zero_()
            st["B"][role][rows].zero_()
        if a is None:
            continue
        st["router"][i * emax: i * emax + a.num_experts] = a.router.weight.float()
        st["E"][i], st["k"][i] = a.num_experts, a.top_k
        sig[i] = (a.num_experts, a.top_k)
        for role in st["A"]:
            e = a._expert(ffn, role)
            if e is None:
                continue
            Bm = st["B"][role]
            st["A"][role][i * emax: i * emax + e.num_experts, : e.r] = e.A()
            Bm[i * emax: i * emax + e.num_experts, :, : e.r] = (e.B().float() * e.scaling).to(Bm.dtype)
    st["sig"] = tuple(sig)
    return True


def _moe_positions(bounds, adapters) -> int:
    """How many leading positions of ``adapters`` the expert stacks cover: all, unless the plan's
    ``StackBounds.mixlora_positions`` says its maker keeps every MixLoRA adapter within them."""
    m = None if bounds is None else bounds.mixlora_positions
    if m is None:
        return len(adapters)
    late = [i for i, a in enumerate(adapters) if i >= m and a is not None]
    if late:
        raise ValueError(f"MixLoRA adapters at positions {late}: the plan's StackBounds keep them within "
                         f"the first {m} positions (mixlora_positions); the plan's maker broke its promise")
    return min(int(m), len(adapters))


def _build_moe_stacks(ffn, adapters, present, differentiable: bool = False) -> dict:
    emax = max(a.num_experts for a in present)
    rmax = max(e.r for a in present for e in a.experts.values())
    top_k = max(a.top_k for a in present)
    bounds = None if differentiable else _plan_bounds(ffn)
    if bounds is not None:  # sized for every adapter the plan's maker serves (StackBounds)
        emax, rmax, top_k = max(emax, bounds.experts), max(rmax, bounds.expert_rank), max(top_k, bounds.top_k)
    S = len(adapters)
    # the positions the expert stacks cover (E and k cover all: 0 past them, the zero expert)
    S_moe = _moe_positions(bounds, adapters)
    dev = ffn._proj("down").weight.device
    router = torch.zeros(S_moe * emax, present[0].router.weight.shape[1], dtype=torch.float32, device=dev)
    E = torch.zeros(S, dtype=torch.long, device=dev)
    k = torch.zeros(S, dtype=torch.long, device=dev)
    stacks_a, stacks_b = {}, {}
    roles = [r for r in ("gate", "up", "gate_up", "down") if r in ffn.proj_names]
    with contextlib.nullcontext() if differentiable else torch.no_grad():
        for s, a in enumerate(adapters):
            if a is None:
                continue
            router[s * emax: s * emax + a.num_experts] = a.router.weight.float()
            E[s], k[s] = a.num_experts, a.top_k
        for role in roles:
            experts = [None if a is None else a._expert(ffn, role) for a in adapters[:S_moe]]
            ref = next((e for e in experts if e is not None), None)
            if ref is None:
                continue
            _, out_f, _ = ref.B().shape
            in_f = ref.A().shape[-1]
            A = torch.zeros(S_moe * emax + 1, rmax, in_f, dtype=ref.lora_A.dtype, device=dev)  # +1: the zero expert
            Bm = torch.zeros(S_moe * emax + 1, out_f, rmax, dtype=ref.lora_B.dtype, device=dev)
            for s, e in enumerate(experts):
                if e is not None:
                    A[s * emax: s * emax + e.num_experts, : e.r] = e.A()
                    Bm[s * emax: s * emax + e.num_experts, :, : e.r] = (e.B().float() * e.scaling).to(Bm.dtype)
            stacks_a[role], stacks_b[role] = A, Bm
    # the (experts, top-k) of each slot, on the host: what E and k hold (``_routing_masks``' cache key)
    sig = tuple(None if a is None else (a.num_experts, a.top_k) for a in adapters)
    return {"router": router, "E": E, "k": k, "K": int(top_k), "emax": emax,
            "A": stacks_a, "B": stacks_b, "sig": sig, "bounded": bounds is not None}
