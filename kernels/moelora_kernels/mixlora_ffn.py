"""The MixLoRA FFN at decode: router, the selected experts' gate/up LoRA, activation and mix, fused.

Op (``mixlora_expert_hidden``; eager ground truth ``mixlora_expert_hidden_reference``, and
``route_topk_reference`` for the fused router): optionally the top-k router
(softmax(W_r x_t), top-K, weights renormalised), then for the K selected experts of each token

    g_tk = g0_t + s · B_g[e] (A_g[e] x_t),   u_tk = u0_t + s · B_u[e] (A_u[e] x_t),   e = idx[t, k]
    h_tk = act(g_tk) ⊙ u_tk   (T, K, F)        h_mix_t = Σ_k w_tk h_tk   (T, F)

where g0 = W_gate x, u0 = W_up x are the frozen projections computed once for all experts and
h_mix feeds the ONE frozen down GEMM (the down experts' delta is ``lora_decode.lora_decode_add_``
on h). Unfused: ~18 launches (router 6, 2 shrinks, 2 expands, adds, act, mul, mix).

Eager batch-1 decode is launch-bound (docs/anchors.md: every Python-level op costs ~10-50 µs while
the arithmetic of a LoRA delta costs ~1 µs), so the one-launch form trades a little redundant
arithmetic for launches: grid (T, G); each program first computes the rank-R shrinks of its
token for all K slots (K·R·D MACs, A read from L2 after the first program; recomputed per
program instead of a second launch), keeps them in registers, then walks its share of the F
columns; G: about one program per SM (``backend.sm_count``). The split form for CUDA graphs
(``route_shrink_partials`` then ``expert_hidden_from_partials``) spreads the router logits and
the shrinks of all experts over D-chunks first. Launch tiles default to
``tiles.lookup(device)["mixlora_hidden"]`` / ``["mixlora_hidden_split"]``. No host sync, launch
count fixed by shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import backend, tiles
from ._host import cdiv, column_groups
from ._host import pow2_at_least as _pow2
from ._triton_common import pick, pick_row, selection, shrink_all_slots, sum_partials
# Re-exported for callers that still import the plain LoRA decode add from here
# (kernels/benchmarks/benchmark_decode_kernels.py); it lives in lora_decode.py.
from .lora_decode import lora_decode_add_, lora_decode_add_reference  # noqa: F401

__all__ = ["mixlora_expert_hidden", "mixlora_expert_hidden_reference", "route_topk_reference",
           "route_shrink_partials", "empty_route_shrink_partials", "expert_hidden_from_partials", "ACTIVATIONS"]

ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2}


def _torch_act(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda v: F.gelu(v, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")


def route_topk_reference(x, router_weight, top_k):
    """(idx (T, K) int64, weights (T, K) fp32 renormalised, probs (T, E) fp32)."""
    probs = torch.softmax(F.linear(x.float(), router_weight.float()), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True), probs


def mixlora_expert_hidden_reference(x, g0, u0, a_gate, b_gate, a_up, b_up, idx, weight, scaling, act="silu"):
    """Eager torch version: returns (h (T, K, F), h_mix (T, F)) in x.dtype, fp32 math."""
    xf = x.float()
    hg = torch.einsum("tkrd,td->tkr", a_gate[idx].float(), xf)  # (T, K, R)
    hu = torch.einsum("tkrd,td->tkr", a_up[idx].float(), xf)
    g = g0.float()[:, None] + scaling * torch.einsum("tkfr,tkr->tkf", b_gate[idx].float(), hg)
    u = u0.float()[:, None] + scaling * torch.einsum("tkfr,tkr->tkf", b_up[idx].float(), hu)
    h = _torch_act(act)(g) * u  # (T, K, F)
    h_mix = (h * weight.float()[..., None]).sum(1)
    return h.to(x.dtype), h_mix.to(x.dtype)


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return v / (1.0 + tl.exp(-v))
    elif ACT == 1:  # gelu, tanh approximation: 0.5 v (1 + tanh(√(2/π)(v + 0.044715 v³)))
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        t = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
        return 0.5 * v * (1.0 + t)
    else:  # exact gelu
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))


@triton.jit
def _route(x_ptr, wr_ptr, idx_ptr, w_ptr, probs_ptr, t, D, E, K, write,
           EP: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 router: softmax(W_r x_t), top-K by repeated argmax, weights renormalised."""
    ee = tl.arange(0, EP)
    emask = ee < E
    logits = tl.zeros([EP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xv = tl.load(x_ptr + t * D + dd, mask=dmask, other=0.0).to(tl.float32)
        wr = tl.load(wr_ptr + ee[:, None] * D + dd[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
        logits += tl.sum(wr.to(tl.float32) * xv[None, :], axis=1)
    return _topk_publish(logits, idx_ptr, w_ptr, probs_ptr, t, E, K, write, EP=EP, KP=KP)


@triton.jit
def _topk_publish(logits, idx_ptr, w_ptr, probs_ptr, t, E, K, write, EP: tl.constexpr, KP: tl.constexpr):
    """softmax over the E logits, top-K by repeated argmax, weights renormalised; the program
    with ``write`` set publishes (idx, weights, probs) for the down kernel and statistics."""
    ee = tl.arange(0, EP)
    kk = tl.arange(0, KP)
    emask = ee < E
    logits = tl.where(emask, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    rem = tl.where(emask, p, -1.0)
    sel_e = tl.zeros([KP], dtype=tl.int32)
    sel_w = tl.zeros([KP], dtype=tl.float32)
    for k in tl.static_range(KP):
        best = tl.max(rem, axis=0)
        best_e = tl.argmax(rem, axis=0).to(tl.int32)
        sel_e = tl.where(kk == k, best_e, sel_e)
        sel_w = tl.where(kk == k, best, sel_w)
        rem = tl.where(ee == best_e, -1.0, rem)
    sel_w = tl.where(kk < K, sel_w, 0.0)
    sel_w = sel_w / tl.sum(sel_w, axis=0)
    if write:
        tl.store(idx_ptr + t * K + kk, sel_e.to(tl.int64), mask=kk < K)
        tl.store(w_ptr + t * K + kk, sel_w, mask=kk < K)
        tl.store(probs_ptr + t * E + ee, p, mask=emask)
    return sel_e, sel_w


@triton.jit
def _moe_hidden_kernel(
    x_ptr, wr_ptr, g0_ptr, u0_ptr, ag_ptr, bg_ptr, au_ptr, bu_ptr, idx_ptr, w_ptr, probs_ptr,
    h_ptr, hmix_ptr, D, FF, E, R, K, scaling, cols_per_group,
    ROUTE: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, ACT: tl.constexpr,
):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    if ROUTE:
        sel_e, sel_w = _route(x_ptr, wr_ptr, idx_ptr, w_ptr, probs_ptr, t, D, E, K, grp == 0,
                              EP=EP, KP=KP, BLOCK_D=BLOCK_D)
    else:
        sel_e, sel_w = selection(idx_ptr, w_ptr, t, K, ROUTED=True, KP=KP)
    hg = shrink_all_slots(x_ptr, ag_ptr, sel_e, t, D, R, K, D, 0, KP=KP, RP=RP, BLOCK_D=BLOCK_D)
    hu = shrink_all_slots(x_ptr, au_ptr, sel_e, t, D, R, K, D, 0, KP=KP, RP=RP, BLOCK_D=BLOCK_D)
    _hidden_cols(g0_ptr, u0_ptr, bg_ptr, bu_ptr, h_ptr, hmix_ptr, hg, hu, sel_e, sel_w, t, FF, R, K, scaling,
                 grp * cols_per_group, cols_per_group, KP=KP, RP=RP, BLOCK_F=BLOCK_F, ACT=ACT)


@triton.jit
def _hidden_cols(g0_ptr, u0_ptr, bg_ptr, bu_ptr, h_ptr, hmix_ptr, hg, hu, sel_e, sel_w, t, FF, R, K, scaling,
                 f_start, n_cols, KP: tl.constexpr, RP: tl.constexpr, BLOCK_F: tl.constexpr, ACT: tl.constexpr):
    """Columns [f_start, f_start + n_cols) of h (T, K, FF) and h_mix (T, FF), given the shrinks
    hg, hu (KP, RP) of the K selected experts."""
    kk = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    rmask = rr < R
    f_end = tl.minimum(f_start + n_cols, FF)
    for f0 in range(f_start, f_end, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        fmask = cols < f_end
        g0 = tl.load(g0_ptr + t * FF + cols, mask=fmask, other=0.0).to(tl.float32)
        u0 = tl.load(u0_ptr + t * FF + cols, mask=fmask, other=0.0).to(tl.float32)
        mix = tl.zeros([BLOCK_F], dtype=tl.float32)
        for k in tl.static_range(KP):
            live = fmask & ((cols * 0 + k) < K)
            e = pick(sel_e, kk, k).to(tl.int64)
            wk = pick(sel_w, kk, k)
            boff = e * FF * R + cols[:, None] * R + rr[None, :]
            bmask = live[:, None] & rmask[None, :]
            bg = tl.load(bg_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
            bu = tl.load(bu_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
            g = g0 + scaling * tl.sum(bg * pick_row(hg, kk, k)[None, :], axis=1)
            u = u0 + scaling * tl.sum(bu * pick_row(hu, kk, k)[None, :], axis=1)
            h = _act(g, ACT) * u
            tl.store(h_ptr + (t * K + k) * FF + cols, h.to(h_ptr.dtype.element_ty), mask=live)
            mix += wk * h
        tl.store(hmix_ptr + t * FF + cols, mix.to(hmix_ptr.dtype.element_ty), mask=fmask)


# ---- split (two-launch) form, for CUDA graphs ----------------------------------------------------
# Inside a CUDA graph a launch costs ~1-2 µs of GPU time and no host time, so the one-launch
# kernel's redundant per-program shrink becomes the cost; the split form spreads the router logits
# and the shrinks of all experts over D-chunks (fp32 partials), and the second kernel sums them.

@triton.jit
def _route_shrink_partial_kernel(x_ptr, wr_ptr, ag_ptr, au_ptr, logit_part_ptr, g_part_ptr, u_part_ptr, D, E, R, NCH,
                                 EP: tl.constexpr, RP: tl.constexpr, CHUNK: tl.constexpr):
    """Over chunk c of x_t: partial router logits (T, EP, NCH) and the gate/up shrinks of ALL
    experts (T, EP, RP, NCH): the selection is not known yet, and E·R rows of A cost little."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    ee = tl.arange(0, EP)
    rr = tl.arange(0, RP)
    dd = c * CHUNK + tl.arange(0, CHUNK)
    dmask = dd < D
    emask = ee < E
    xv = tl.load(x_ptr + t * D + dd, mask=dmask, other=0.0).to(tl.float32)
    wr = tl.load(wr_ptr + ee[:, None] * D + dd[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
    tl.store(logit_part_ptr + (t * EP + ee) * NCH + c, tl.sum(wr.to(tl.float32) * xv[None, :], axis=1))
    aoffs = (ee[:, None, None] * R + rr[None, :, None]) * D + dd[None, None, :]
    amask = emask[:, None, None] & (rr[None, :, None] < R) & dmask[None, None, :]
    poffs = ((t * EP + ee[:, None]) * RP + rr[None, :]) * NCH + c
    a = tl.load(ag_ptr + aoffs, mask=amask, other=0.0).to(tl.float32)
    tl.store(g_part_ptr + poffs, tl.sum(a * xv[None, None, :], axis=2))
    a = tl.load(au_ptr + aoffs, mask=amask, other=0.0).to(tl.float32)
    tl.store(u_part_ptr + poffs, tl.sum(a * xv[None, None, :], axis=2))


@triton.jit
def _select_rows(z_all, sel_e, kk, EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr):
    """(KP, RP) rows sel_e[k] of an (EP, RP) register tile."""
    ee = tl.arange(0, EP)
    out = tl.zeros([KP, RP], dtype=tl.float32)
    for k in tl.static_range(KP):
        row = tl.sum(tl.where(ee[:, None] == pick(sel_e, kk, k), z_all, 0.0), axis=0)
        out = tl.where(kk[:, None] == k, row[None, :], out)
    return out


@triton.jit
def _moe_hidden_partial_kernel(
    g0_ptr, u0_ptr, bg_ptr, bu_ptr, logit_part_ptr, g_part_ptr, u_part_ptr, idx_ptr, w_ptr, probs_ptr,
    h_ptr, hmix_ptr, FF, E, R, K, NCH, scaling, cols_per_group,
    EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, NCHP: tl.constexpr, BLOCK_F: tl.constexpr,
    ACT: tl.constexpr,
):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    kk = tl.arange(0, KP)
    ee = tl.arange(0, EP)
    cc = tl.arange(0, NCHP)
    lp = tl.load(logit_part_ptr + (t * EP + ee[:, None]) * NCH + cc[None, :],
                 mask=(cc[None, :] < NCH) & (ee[:, None] >= 0), other=0.0)
    sel_e, sel_w = _topk_publish(tl.sum(lp, axis=1), idx_ptr, w_ptr, probs_ptr, t, E, K, grp == 0, EP=EP, KP=KP)
    hg = _select_rows(sum_partials(g_part_ptr, t, NCH, ROWS=EP, RP=RP, NCHP=NCHP), sel_e, kk, EP=EP, KP=KP, RP=RP)
    hu = _select_rows(sum_partials(u_part_ptr, t, NCH, ROWS=EP, RP=RP, NCHP=NCHP), sel_e, kk, EP=EP, KP=KP, RP=RP)
    _hidden_cols(g0_ptr, u0_ptr, bg_ptr, bu_ptr, h_ptr, hmix_ptr, hg, hu, sel_e, sel_w, t, FF, R, K, scaling,
                 grp * cols_per_group, cols_per_group, KP=KP, RP=RP, BLOCK_F=BLOCK_F, ACT=ACT)


backend.require_same_backend(_moe_hidden_partial_kernel)  # TRITON_INTERPRET unchanged since backend's import


def _check_hidden_shapes(x, g0, u0, a_gate, b_gate, a_up, b_up, router_weight, K) -> None:
    T, D = x.shape
    E, FF = a_gate.shape[0], b_gate.shape[1]
    if g0.shape != (T, FF) or u0.shape != (T, FF) or a_up.shape != a_gate.shape or b_up.shape != b_gate.shape \
            or a_gate.shape[2] != D:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, g0 {tuple(g0.shape)}, u0 {tuple(u0.shape)}, "
                         f"A {tuple(a_gate.shape)}/{tuple(a_up.shape)}, B {tuple(b_gate.shape)}/{tuple(b_up.shape)}")
    if router_weight is not None and (router_weight.shape != (E, D) or not 1 <= K <= E):
        raise ValueError(f"router_weight must be ({E}, {D}) and 1 <= top_k <= {E}; got "
                         f"{tuple(router_weight.shape)}, top_k={K}")


def _split_tiles(device: torch.device, tokens: int) -> dict[str, int]:
    return tiles.for_tokens(tiles.lookup(device)["mixlora_hidden_split"], tokens)


def mixlora_expert_hidden(x, g0, u0, a_gate, b_gate, a_up, b_up, idx=None, weight=None, scaling=1.0,
                          act="silu", router_weight=None, top_k=None, block_f: int | None = None,
                          block_d: int | None = None, num_warps: int | None = None, programs: int | None = None,
                          split: bool = False, chunk: int | None = None):
    """Triton version of ``mixlora_expert_hidden_reference`` (forward only: decode/inference).

    With ``router_weight`` (E, D) fp32 and ``top_k``, the router runs inside the kernel and the
    return value is (h, h_mix, idx, weight, probs); otherwise ``idx``/``weight`` are inputs and it
    returns (h, h_mix). ``split=True`` (router only) uses the two-launch form for CUDA graphs:
    ``route_shrink_partials`` then ``expert_hidden_from_partials``. Tiles left None come from
    ``tiles.lookup(x.device)``; ``block_d`` is the one-launch form's D block, ``chunk`` the split form's."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; supported: {sorted(ACTIVATIONS)}")
    backend.check_device(x, "mixlora_expert_hidden")
    route = router_weight is not None
    K = top_k if route else idx.shape[1]
    _check_hidden_shapes(x, g0, u0, a_gate, b_gate, a_up, b_up, router_weight, K)
    if split:
        if not route:
            raise ValueError("split=True needs the fused router (router_weight and top_k)")
        parts = route_shrink_partials(x, router_weight, a_gate, a_up, chunk=chunk)
        return expert_hidden_from_partials(g0, u0, b_gate, b_up, parts, top_k, scaling, act, block_f=block_f,
                                           num_warps=num_warps, programs=programs)
    T, D = x.shape
    E, R, _ = a_gate.shape
    FF = b_gate.shape[1]
    x, g0, u0 = x.contiguous(), g0.contiguous(), u0.contiguous()
    dev = x.device
    cfg = tiles.lookup(dev)["mixlora_hidden"]
    block_f = cfg["block_f"] if block_f is None else block_f
    h = torch.empty(T, K, FF, dtype=x.dtype, device=dev)
    h_mix = torch.empty(T, FF, dtype=x.dtype, device=dev)
    if route:
        idx = torch.empty(T, K, dtype=torch.int64, device=dev)
        weight = torch.empty(T, K, dtype=torch.float32, device=dev)
        probs = torch.empty(T, E, dtype=torch.float32, device=dev)
        wr = router_weight.contiguous()
    else:
        idx, weight, probs, wr = idx.contiguous(), weight.contiguous(), h_mix, x  # dummies never read
    G, per = column_groups(T, FF, block_f, dev, programs)
    _moe_hidden_kernel[(T, G)](
        x, wr, g0, u0, a_gate.contiguous(), b_gate.contiguous(), a_up.contiguous(), b_up.contiguous(),
        idx, weight, probs, h, h_mix, D, FF, E, R, K, float(scaling), per,
        ROUTE=route, EP=_pow2(E, 2), KP=_pow2(K, 1), RP=_pow2(R, 16),
        BLOCK_D=cfg["block_d"] if block_d is None else block_d, BLOCK_F=block_f,
        ACT=ACTIVATIONS[act], num_warps=cfg["num_warps"] if num_warps is None else num_warps,
    )
    return (h, h_mix, idx, weight, probs) if route else (h, h_mix)


def empty_route_shrink_partials(x, a_gate, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 buffers (router logits (T, EP, NCH), gate and up shrinks (T, EP, RP, NCH)) for
    ``route_shrink_partials``. Separate so that a caller can allocate them on the stream that
    will read them and launch the kernel on another (ops.py overlaps it with the frozen GEMMs)."""
    T, D = x.shape
    E, R, _ = a_gate.shape
    chunk = _split_tiles(x.device, T)["chunk"] if chunk is None else chunk
    EP, RP, nch = _pow2(E, 2), _pow2(R, 16), cdiv(D, chunk)
    lp = torch.empty(T, EP, nch, dtype=torch.float32, device=x.device)
    gp = torch.empty(T, EP, RP, nch, dtype=torch.float32, device=x.device)
    return lp, gp, torch.empty_like(gp)


def route_shrink_partials(x, router_weight, a_gate, a_up, chunk: int | None = None, out=None):
    """First launch of the split MoE hidden: over ``chunk``-wide slices of x, the partial router
    logits and the rank-R gate/up shrinks of ALL experts (the selection is not known yet).
    Needs only x, so it can run beside the frozen gate/up GEMMs. Returns the partials."""
    T, D = x.shape
    E, R, _ = a_gate.shape
    cfg = _split_tiles(x.device, T)
    chunk = cfg["chunk"] if chunk is None else chunk
    lp, gp, up = out if out is not None else empty_route_shrink_partials(x, a_gate, chunk)
    nch = lp.shape[2]
    if cdiv(D, chunk) != nch:
        raise ValueError(f"partials were sized for {nch} chunks, x needs {cdiv(D, chunk)} (chunk={chunk})")
    _route_shrink_partial_kernel[(T, nch)](x.contiguous(), router_weight.contiguous(), a_gate.contiguous(),
                                           a_up.contiguous(), lp, gp, up, D, E, R, nch, EP=lp.shape[1],
                                           RP=gp.shape[2], CHUNK=chunk, num_warps=cfg["shrink_warps"])
    return lp, gp, up


def expert_hidden_from_partials(g0, u0, b_gate, b_up, partials, top_k: int, scaling: float, act: str = "silu",
                                block_f: int | None = None, num_warps: int | None = None,
                                programs: int | None = None):
    """Second launch of the split MoE hidden: top-k from the summed logits, the selected
    experts' gate/up expands, activation and mix. Returns (h, h_mix, idx, weight, probs)."""
    lp, gp, up = partials
    T, FF = g0.shape
    E, _, R = b_gate.shape
    dev, K = g0.device, top_k
    cfg = _split_tiles(dev, T)
    block_f = cfg["block_f"] if block_f is None else block_f
    g0, u0 = g0.contiguous(), u0.contiguous()
    h = torch.empty(T, K, FF, dtype=g0.dtype, device=dev)
    h_mix = torch.empty(T, FF, dtype=g0.dtype, device=dev)
    idx = torch.empty(T, K, dtype=torch.int64, device=dev)
    weight = torch.empty(T, K, dtype=torch.float32, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    G, per = column_groups(T, FF, block_f, dev, programs, split=True)
    nch = lp.shape[2]
    _moe_hidden_partial_kernel[(T, G)](
        g0, u0, b_gate.contiguous(), b_up.contiguous(), lp, gp, up, idx, weight, probs, h, h_mix,
        FF, E, R, K, nch, float(scaling), per, EP=lp.shape[1], KP=_pow2(K, 1), RP=gp.shape[2],
        NCHP=_pow2(nch, 2), BLOCK_F=block_f, ACT=ACTIVATIONS[act],
        num_warps=cfg["num_warps"] if num_warps is None else num_warps)
    return h, h_mix, idx, weight, probs
