"""@triton.jit helpers shared by the decode kernels of ``lora_decode`` and ``mixlora_ffn``.

Few tokens, K routed slots per token, rank R: the helpers hold the K selected experts and their
weights as small (KP,) register vectors and the rank-R shrinks as a (KP, RP) register tile
(KP, RP: K and R padded to powers of two; register arrays need compile-time indices, hence
``pick``/``pick_row``). No op of its own, so no reference: the kernels that use them are tested
against their references.
"""
import triton
import triton.language as tl

from . import backend


@triton.jit
def pick(vec, kk, k):
    """vec[k] of a small (KP,) vector as a scalar (register arrays need compile-time indices)."""
    return tl.sum(tl.where(kk == k, vec, 0), axis=0)


@triton.jit
def pick_row(mat, kk, k):
    """mat[k, :] of a (KP, RP) register tile."""
    return tl.sum(tl.where(kk[:, None] == k, mat, 0.0), axis=0)


@triton.jit
def selection(idx_ptr, w_ptr, t, K, ROUTED: tl.constexpr, KP: tl.constexpr):
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
def shrink_all_slots(x_ptr, a_ptr, sel_e, t, IN, R, K, x_tok_stride, x_slot_stride,
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
            e = pick(sel_e, kk, k).to(tl.int64)
            live = dmask & ((dd * 0 + k) < K)  # a vector mask: slots k >= K load nothing
            xv = tl.load(x_ptr + t * x_tok_stride + k * x_slot_stride + dd, mask=live, other=0.0)
            xv = xv.to(tl.float32)
            a = tl.load(a_ptr + e * R * IN + rr[:, None] * IN + dd[None, :],
                        mask=rmask[:, None] & live[None, :], other=0.0).to(tl.float32)
            z += tl.where(kk[:, None] == k, tl.sum(a * xv[None, :], axis=1)[None, :], 0.0)
    return z


@triton.jit
def sum_partials(part_ptr, t, NCH, ROWS: tl.constexpr, RP: tl.constexpr, NCHP: tl.constexpr):
    """(ROWS, RP) fp32: the partials of token t (layout (T, ROWS, RP, NCH)) summed over chunks
    (the split forms' shrinks, written one IN-chunk per program)."""
    ii = tl.arange(0, ROWS)
    rr = tl.arange(0, RP)
    cc = tl.arange(0, NCHP)
    offs = ((t * ROWS + ii[:, None, None]) * RP + rr[None, :, None]) * NCH + cc[None, None, :]
    p = tl.load(part_ptr + offs, mask=(cc[None, None, :] < NCH) & (ii[:, None, None] >= 0) & (rr[None, :, None] >= 0),
                other=0.0)
    return tl.sum(p, axis=2)


backend.require_same_backend(sum_partials)  # TRITON_INTERPRET unchanged since backend's import
