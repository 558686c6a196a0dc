"""Decode kernels for mixtures of LoRA experts: few tokens, as few launches as possible.

Eager batch-1 decode is launch-bound (ANCHORS.md: every Python-level op costs ~10-50 µs while
the arithmetic of a LoRA delta costs ~1 µs), so these kernels trade a little redundant
arithmetic for launches. Two kernels:

``mixlora_expert_hidden`` (MixLoRA FFN, one launch): optionally the top-k router, then for the
K selected experts of each token

    g_tk = g0_t + s · B_g[e] (A_g[e] x_t),   u_tk = u0_t + s · B_u[e] (A_u[e] x_t),   e = idx[t, k]
    h_tk = act(g_tk) ⊙ u_tk   (T, K, F)        h_mix_t = Σ_k w_tk h_tk   (T, F)

where g0 = W_gate x, u0 = W_up x are the frozen projections computed once for all experts and
h_mix feeds the ONE frozen down GEMM. Unfused: ~18 launches (router 6, 2 shrinks, 2 expands,
adds, act, mul, mix).

``lora_decode_add_`` (one launch): y_t += s · Σ_k w_tk B[e] (A[e] x_tk) in place, for a
shared input x (T, IN) (LoRA-Switch linears) or a per-slot input (T, K, IN) (MixLoRA down).

Layout: grid (T, G). Each program first computes the rank-R shrinks of its token for all K
slots (K·R·D MACs, A read from L2 after the first program; recomputed per program instead of a
second launch), keeps them in registers, then walks its share of output columns. G is chosen so
that about one program per SM runs. No host sync, launch count fixed by shapes.
The ``*_reference`` functions are the eager ground truth.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._host import cdiv
from ._host import pow2_at_least as _pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2}
_TARGET_PROGRAMS = 132  # about one per H100 SM: the redundant shrinks stay cheap


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


def lora_decode_add_reference(y, x, lora_A, lora_B, idx, weight, scaling):
    """y += s Σ_k w_tk B[idx_tk] A[idx_tk] x_(t,k), fp32 math; returns y."""
    xk = x.float() if x.dim() == 3 else x.float()[:, None].expand(-1, idx.shape[1], -1)
    h = torch.einsum("tkrd,tkd->tkr", lora_A[idx].float(), xk)
    d = torch.einsum("tkor,tkr->to", lora_B[idx].float(), h * weight.float()[..., None])
    y.copy_((y.float() + scaling * d).to(y.dtype))
    return y


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
def _pick(vec, kk, k):
    """vec[k] of a small (KP,) vector as a scalar (register arrays need compile-time indices)."""
    return tl.sum(tl.where(kk == k, vec, 0), axis=0)


@triton.jit
def _pick_row(mat, kk, k):
    """mat[k, :] of a (KP, RP) register tile."""
    return tl.sum(tl.where(kk[:, None] == k, mat, 0.0), axis=0)


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
def _shrink_all_slots(x_ptr, a_ptr, sel_e, t, IN, R, K, x_tok_stride, x_slot_stride,
                      KP: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Z[k, :] = A[sel_e[k]] @ x_(t,k) for all K slots: a (KP, RP) fp32 register tile.
    Strides (tok, slot): (IN, 0) for a shared input (T, IN), (K*IN, IN) for a per-slot (T, K, IN)."""
    kk = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    rmask = rr < R
    z = tl.zeros([KP, RP], dtype=tl.float32)
    for d0 in range(0, IN, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < IN
        for k in tl.static_range(KP):
            e = _pick(sel_e, kk, k).to(tl.int64)
            live = dmask & ((dd * 0 + k) < K)  # a vector mask: slots k >= K load nothing
            xv = tl.load(x_ptr + t * x_tok_stride + k * x_slot_stride + dd, mask=live, other=0.0)
            xv = xv.to(tl.float32)
            a = tl.load(a_ptr + e * R * IN + rr[:, None] * IN + dd[None, :],
                        mask=rmask[:, None] & live[None, :], other=0.0).to(tl.float32)
            z += tl.where(kk[:, None] == k, tl.sum(a * xv[None, :], axis=1)[None, :], 0.0)
    return z


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
        sel_e, sel_w = _selection(idx_ptr, w_ptr, t, K, ROUTED=True, KP=KP)
    hg = _shrink_all_slots(x_ptr, ag_ptr, sel_e, t, D, R, K, D, 0, KP=KP, RP=RP, BLOCK_D=BLOCK_D)
    hu = _shrink_all_slots(x_ptr, au_ptr, sel_e, t, D, R, K, D, 0, KP=KP, RP=RP, BLOCK_D=BLOCK_D)
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
            e = _pick(sel_e, kk, k).to(tl.int64)
            wk = _pick(sel_w, kk, k)
            boff = e * FF * R + cols[:, None] * R + rr[None, :]
            bmask = live[:, None] & rmask[None, :]
            bg = tl.load(bg_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
            bu = tl.load(bu_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
            g = g0 + scaling * tl.sum(bg * _pick_row(hg, kk, k)[None, :], axis=1)
            u = u0 + scaling * tl.sum(bu * _pick_row(hu, kk, k)[None, :], axis=1)
            h = _act(g, ACT) * u
            tl.store(h_ptr + (t * K + k) * FF + cols, h.to(h_ptr.dtype.element_ty), mask=live)
            mix += wk * h
        tl.store(hmix_ptr + t * FF + cols, mix.to(hmix_ptr.dtype.element_ty), mask=fmask)


@triton.jit
def _selection(idx_ptr, w_ptr, t, K, ROUTED: tl.constexpr, KP: tl.constexpr):
    """(experts, weights) of token t as (KP,) vectors; plain LoRA (not ROUTED): one adapter,
    index 0, weight 1, and no idx/weight tensors are read."""
    kk = tl.arange(0, KP)
    if ROUTED:
        sel_e = tl.load(idx_ptr + t * K + kk, mask=kk < K, other=0).to(tl.int32)
        sel_w = tl.load(w_ptr + t * K + kk, mask=kk < K, other=0.0).to(tl.float32)
    else:
        sel_e = tl.zeros([KP], dtype=tl.int32)
        sel_w = tl.where(kk < K, 1.0, 0.0)
    return sel_e, sel_w


@triton.jit
def _lora_add_kernel(
    y_ptr, out_ptr, x_ptr, a_ptr, b_ptr, idx_ptr, w_ptr, IN, OUT, R, K, scaling, cols_per_group, x_tok_stride,
    x_slot_stride, ROUTED: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    sel_e, sel_w = _selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)
    z = _shrink_all_slots(x_ptr, a_ptr, sel_e, t, IN, R, K, x_tok_stride, x_slot_stride, KP=KP, RP=RP,
                          BLOCK_D=BLOCK_D)
    _expand_cols(y_ptr, out_ptr, b_ptr, z, sel_e, sel_w, t, OUT, R, K, scaling, grp * cols_per_group,
                 cols_per_group, HAS_Y=True, KP=KP, RP=RP, BLOCK_N=BLOCK_N)


@triton.jit
def _expand_cols(y_ptr, out_ptr, b_ptr, z, sel_e, sel_w, t, OUT, R, K, scaling, n_start, n_cols,
                 HAS_Y: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, cols] = y[t, cols] + s Σ_k w_k B[e_k][cols] z[k] for cols in [n_start, n_start + n_cols);
    without HAS_Y the delta alone (y is not read)."""
    kk = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    rmask = rr < R
    n_end = tl.minimum(n_start + n_cols, OUT)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        nmask = cols < n_end
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in tl.static_range(KP):
            live = nmask & ((cols * 0 + k) < K)
            e = _pick(sel_e, kk, k).to(tl.int64)
            b = tl.load(b_ptr + e * OUT * R + cols[:, None] * R + rr[None, :],
                        mask=live[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += _pick(sel_w, kk, k) * tl.sum(b * _pick_row(z, kk, k)[None, :], axis=1)
        acc = scaling * acc
        if HAS_Y:
            acc += tl.load(y_ptr + t * OUT + cols, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * OUT + cols, acc.to(out_ptr.dtype.element_ty), mask=nmask)


# ---- split (two-launch) forms, for CUDA graphs ---------------------------------------------------
# Inside a CUDA graph a launch costs ~1-2 µs of GPU time and no host time, so the one-launch
# kernels' redundant per-program shrink (every program streams all of A_sel, K·R·IN elements,
# through one SM) becomes the cost (H100: 11 µs for a 4096->4096 routed delta, 27 µs for
# 11008->4096). The split form spreads the shrink over IN-chunks (one program per chunk writes
# fp32 partial sums), and the expand programs add the few partials up before their columns.

@triton.jit
def _shrink_partial_kernel(x_ptr, a_ptr, idx_ptr, w_ptr, part_ptr, IN, R, K, NCH, x_tok_stride, x_slot_stride,
                           ROUTED: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, CHUNK: tl.constexpr):
    """part[t, k, r, c] = Σ_{d in chunk c} A[e_tk][r, d] x_(t,k)[d], fp32, layout (T, KP, RP, NCH)."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    kk = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    dd = c * CHUNK + tl.arange(0, CHUNK)
    dmask = dd < IN
    rmask = rr < R
    sel_e, _ = _selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)  # the weights are the expand's job
    for k in tl.static_range(KP):
        e = _pick(sel_e, kk, k).to(tl.int64)
        live = dmask & ((dd * 0 + k) < K)
        xv = tl.load(x_ptr + t * x_tok_stride + k * x_slot_stride + dd, mask=live, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + e * R * IN + rr[:, None] * IN + dd[None, :], mask=rmask[:, None] & live[None, :],
                    other=0.0).to(tl.float32)
        tl.store(part_ptr + ((t * KP + k) * RP + rr) * NCH + c, tl.sum(a * xv[None, :], axis=1))


@triton.jit
def _sum_partials(part_ptr, t, NCH, ROWS: tl.constexpr, RP: tl.constexpr, NCHP: tl.constexpr):
    """(ROWS, RP) fp32: the partials of token t (layout (T, ROWS, RP, NCH)) summed over chunks."""
    ii = tl.arange(0, ROWS)
    rr = tl.arange(0, RP)
    cc = tl.arange(0, NCHP)
    offs = ((t * ROWS + ii[:, None, None]) * RP + rr[None, :, None]) * NCH + cc[None, None, :]
    p = tl.load(part_ptr + offs, mask=(cc[None, None, :] < NCH) & (ii[:, None, None] >= 0) & (rr[None, :, None] >= 0),
                other=0.0)
    return tl.sum(p, axis=2)


@triton.jit
def _expand_partial_kernel(y_ptr, out_ptr, b_ptr, idx_ptr, w_ptr, part_ptr, OUT, R, K, NCH, scaling,
                           cols_per_group, ROUTED: tl.constexpr, HAS_Y: tl.constexpr, KP: tl.constexpr,
                           RP: tl.constexpr, NCHP: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    sel_e, sel_w = _selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)
    z = _sum_partials(part_ptr, t, NCH, ROWS=KP, RP=RP, NCHP=NCHP)
    _expand_cols(y_ptr, out_ptr, b_ptr, z, sel_e, sel_w, t, OUT, R, K, scaling, grp * cols_per_group,
                 cols_per_group, HAS_Y=HAS_Y, KP=KP, RP=RP, BLOCK_N=BLOCK_N)


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
        row = tl.sum(tl.where(ee[:, None] == _pick(sel_e, kk, k), z_all, 0.0), axis=0)
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
    hg = _select_rows(_sum_partials(g_part_ptr, t, NCH, ROWS=EP, RP=RP, NCHP=NCHP), sel_e, kk, EP=EP, KP=KP, RP=RP)
    hu = _select_rows(_sum_partials(u_part_ptr, t, NCH, ROWS=EP, RP=RP, NCHP=NCHP), sel_e, kk, EP=EP, KP=KP, RP=RP)
    _hidden_cols(g0_ptr, u0_ptr, bg_ptr, bu_ptr, h_ptr, hmix_ptr, hg, hu, sel_e, sel_w, t, FF, R, K, scaling,
                 grp * cols_per_group, cols_per_group, KP=KP, RP=RP, BLOCK_F=BLOCK_F, ACT=ACT)


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1)")


def _groups(T: int, n_cols: int, block: int, programs: int | None = None, split: bool = False) -> tuple[int, int]:
    """(G, columns per group): about ``programs`` programs over T tokens. Default: about one per
    SM for the one-launch kernels (each program redoes the shrink, so few programs), one column
    block per program for the split expands (their shrink is done: more programs hide latency;
    with ~5 groups per token at 32 tokens the expand took 25 µs on the H100, longer than the
    GEMM it runs beside)."""
    if programs is None:
        programs = T * cdiv(n_cols, block) if split else _TARGET_PROGRAMS
    g = max(1, min(cdiv(n_cols, block), cdiv(programs, T)))
    per = cdiv(cdiv(n_cols, g), block) * block
    return cdiv(n_cols, per), per


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


def mixlora_expert_hidden(x, g0, u0, a_gate, b_gate, a_up, b_up, idx=None, weight=None, scaling=1.0,
                          act="silu", router_weight=None, top_k=None, block_f: int = 128, block_d: int = 1024,
                          num_warps: int = 8, programs: int | None = None, split: bool = False, chunk: int = 64):
    """Triton version of ``mixlora_expert_hidden_reference`` (forward only: decode/inference).

    With ``router_weight`` (E, D) fp32 and ``top_k``, the router runs inside the kernel and the
    return value is (h, h_mix, idx, weight, probs); otherwise ``idx``/``weight`` are inputs and it
    returns (h, h_mix). ``split=True`` (router only) uses the two-launch form for CUDA graphs:
    ``route_shrink_partials`` then ``expert_hidden_from_partials``. Default tiles: the best of
    kernels/benchmarks/benchmark_decode_kernels.py on the H100."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; supported: {sorted(ACTIVATIONS)}")
    _check_device(x, "mixlora_expert_hidden")
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
    h = torch.empty(T, K, FF, dtype=x.dtype, device=dev)
    h_mix = torch.empty(T, FF, dtype=x.dtype, device=dev)
    if route:
        idx = torch.empty(T, K, dtype=torch.int64, device=dev)
        weight = torch.empty(T, K, dtype=torch.float32, device=dev)
        probs = torch.empty(T, E, dtype=torch.float32, device=dev)
        wr = router_weight.contiguous()
    else:
        idx, weight, probs, wr = idx.contiguous(), weight.contiguous(), h_mix, x  # dummies never read
    G, per = _groups(T, FF, block_f, programs)
    _moe_hidden_kernel[(T, G)](
        x, wr, g0, u0, a_gate.contiguous(), b_gate.contiguous(), a_up.contiguous(), b_up.contiguous(),
        idx, weight, probs, h, h_mix, D, FF, E, R, K, float(scaling), per,
        ROUTE=route, EP=_pow2(E, 2), KP=_pow2(K, 1), RP=_pow2(R, 16), BLOCK_D=block_d, BLOCK_F=block_f,
        ACT=ACTIVATIONS[act], num_warps=num_warps,
    )
    return (h, h_mix, idx, weight, probs) if route else (h, h_mix)


def empty_route_shrink_partials(x, a_gate, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 buffers (router logits (T, EP, NCH), gate and up shrinks (T, EP, RP, NCH)) for
    ``route_shrink_partials``. Separate so that a caller can allocate them on the stream that
    will read them and launch the kernel on another (ops.py overlaps it with the frozen GEMMs)."""
    T, D = x.shape
    E, R, _ = a_gate.shape
    EP, RP, nch = _pow2(E, 2), _pow2(R, 16), cdiv(D, chunk)
    lp = torch.empty(T, EP, nch, dtype=torch.float32, device=x.device)
    gp = torch.empty(T, EP, RP, nch, dtype=torch.float32, device=x.device)
    return lp, gp, torch.empty_like(gp)


def route_shrink_partials(x, router_weight, a_gate, a_up, chunk: int = 256, out=None):
    """First launch of the split MoE hidden: over ``chunk``-wide slices of x, the partial router
    logits and the rank-R gate/up shrinks of ALL experts (the selection is not known yet).
    Needs only x, so it can run beside the frozen gate/up GEMMs. Returns the partials."""
    lp, gp, up = out if out is not None else empty_route_shrink_partials(x, a_gate, chunk)
    T, D = x.shape
    E, R, _ = a_gate.shape
    nch = lp.shape[2]
    if cdiv(D, chunk) != nch:
        raise ValueError(f"partials were sized for {nch} chunks, x needs {cdiv(D, chunk)} (chunk={chunk})")
    _route_shrink_partial_kernel[(T, nch)](x.contiguous(), router_weight.contiguous(), a_gate.contiguous(),
                                           a_up.contiguous(), lp, gp, up, D, E, R, nch, EP=lp.shape[1],
                                           RP=gp.shape[2], CHUNK=chunk, num_warps=4)
    return lp, gp, up


def expert_hidden_from_partials(g0, u0, b_gate, b_up, partials, top_k: int, scaling: float, act: str = "silu",
                                block_f: int = 128, num_warps: int = 8, programs: int | None = None):
    """Second launch of the split MoE hidden: top-k from the summed logits, the selected
    experts' gate/up expands, activation and mix. Returns (h, h_mix, idx, weight, probs)."""
    lp, gp, up = partials
    T, FF = g0.shape
    E, _, R = b_gate.shape
    dev, K = g0.device, top_k
    g0, u0 = g0.contiguous(), u0.contiguous()
    h = torch.empty(T, K, FF, dtype=g0.dtype, device=dev)
    h_mix = torch.empty(T, FF, dtype=g0.dtype, device=dev)
    idx = torch.empty(T, K, dtype=torch.int64, device=dev)
    weight = torch.empty(T, K, dtype=torch.float32, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    G, per = _groups(T, FF, block_f, programs, split=True)
    nch = lp.shape[2]
    _moe_hidden_partial_kernel[(T, G)](
        g0, u0, b_gate.contiguous(), b_up.contiguous(), lp, gp, up, idx, weight, probs, h, h_mix,
        FF, E, R, K, nch, float(scaling), per, EP=lp.shape[1], KP=_pow2(K, 1), RP=gp.shape[2],
        NCHP=_pow2(nch, 2), BLOCK_F=block_f, ACT=ACTIVATIONS[act], num_warps=num_warps)
    return h, h_mix, idx, weight, probs


def lora_decode_add_(y, x, lora_A, lora_B, idx, weight, scaling, block_n: int = 128, block_d: int = 1024,
                     num_warps: int = 4, out=None, programs: int | None = None, split: bool = False,
                     chunk: int = 128):
    """y (T, OUT) + s Σ_k w_tk B[idx_tk] A[idx_tk] x_(t,k) in one launch, written into ``out``
    (default: y itself, in place); returns the tensor written. x is (T, IN) shared by the slots
    or (T, K, IN) per slot. With ``idx is None`` it is plain LoRA: A (R, IN) or (1, R, IN),
    B (OUT, R) or (1, OUT, R), K = 1 and weight 1 (``weight`` is ignored). ``split=True`` is the
    two-launch form for CUDA graphs (shrink over ``chunk``-wide slices of x, then expand).
    ``y=None`` (split only) writes the delta alone into ``out`` (T, OUT), e.g. fp32: ops.py
    computes it beside the frozen GEMM and leaves the add to the compiled graph."""
    _check_device(x, "lora_decode_add_")
    routed = idx is not None
    if not routed:
        lora_A = lora_A.reshape(1, *lora_A.shape[-2:])
        lora_B = lora_B.reshape(1, *lora_B.shape[-2:])
    has_y = y is not None
    if not has_y and (out is None or not split):
        raise ValueError("y=None (delta only) needs out= and split=True")
    T = x.shape[0]
    K = idx.shape[1] if routed else 1
    E, R, IN = lora_A.shape
    OUT = lora_B.shape[1]
    per_slot = x.dim() == 3
    y_shape = y.shape if has_y else out.shape
    if y_shape != (T, OUT) or x.shape[-1] != IN or (per_slot and x.shape[:2] != (T, K)) \
            or lora_B.shape != (E, OUT, R) or (routed and (idx.shape != (T, K) or weight.shape != (T, K))):
        raise ValueError(f"shape mismatch: y/out {tuple(y_shape)}, x {tuple(x.shape)}, A {tuple(lora_A.shape)}, "
                         f"B {tuple(lora_B.shape)}, idx {None if idx is None else tuple(idx.shape)}, "
                         f"weight {None if weight is None else tuple(weight.shape)}")
    if out is None:
        if not y.is_contiguous():
            raise ValueError("y must be contiguous (it is updated in place)")
        out = y
    elif has_y:
        y = y.contiguous()
    else:
        y = out  # never read (HAS_Y=False)
    idx_arg = idx.contiguous() if routed else out  # dummies never read when not routed
    w_arg = weight.contiguous() if routed else out
    G, per = _groups(T, OUT, block_n, programs, split)
    KP, RP, xs = _pow2(K, 1), _pow2(R, 16), (K * IN if per_slot else IN, IN if per_slot else 0)
    if split:
        nch = cdiv(IN, chunk)
        part = torch.empty(T, KP, RP, nch, dtype=torch.float32, device=out.device)
        x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
        _shrink_partial_kernel[(T, nch)](x, lora_A, idx_arg, w_arg, part, IN, R, K, nch, *xs, ROUTED=routed, KP=KP,
                                         RP=RP, CHUNK=chunk, num_warps=4)
        _expand_partial_kernel[(T, G)](y, out, lora_B, idx_arg, w_arg, part, OUT, R, K, nch, float(scaling), per,
                                       ROUTED=routed, HAS_Y=has_y, KP=KP, RP=RP, NCHP=_pow2(nch, 2),
                                       BLOCK_N=block_n, num_warps=num_warps)
        return out
    _lora_add_kernel[(T, G)](
        y, out, x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), idx_arg, w_arg,
        IN, OUT, R, K, float(scaling), per, *xs,
        ROUTED=routed, KP=KP, RP=RP, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out
