"""The LoRA delta of an adapted linear at decode, added in place: plain LoRA, LoRA-Switch, MixLoRA down.

Op (``lora_decode_add_``; eager ground truth ``lora_decode_add_reference``), for T tokens (few),
K routed slots per token with experts ``idx`` (T, K) and weights ``weight`` (T, K):

    y_t += s · Σ_k w_tk B[idx_tk] (A[idx_tk] x_(t,k))      A (E, R, IN), B (E, OUT, R)

with x (T, IN) shared by the slots (LoRA-Switch linears) or (T, K, IN) one per slot (the MixLoRA
down projection on each expert's own hidden); ``idx=None`` is plain LoRA (one adapter, weight 1).

Two forms, picked by ``split``:

- one launch (eager decode, host-bound: every launch costs ~30-60 µs of host time while the
  arithmetic costs ~1 µs): grid (T, G); each program computes the rank-R shrinks of its token for
  all K slots (K·R·IN MACs, A read from L2 after the first program; recomputed per program
  instead of a second launch), keeps them in registers, then walks its share of the output
  columns. G: about one program per SM (``backend.sm_count``).
- split, two launches (inside CUDA graphs, where a launch costs no host time and the redundant
  per-program shrink becomes the cost: H100, 11 µs for a 4096->4096 routed delta one-launch, 27 µs
  for 11008->4096): the shrink spread over IN-chunks (one program per chunk writes fp32 partial
  sums), then the expand, whose programs add the few partials up before their columns.

Launch tiles default to ``tiles.lookup(device)["lora_decode"]`` / ``["lora_decode_split"]``.
No host sync, launch count fixed by shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend, tiles
from ._host import cdiv, column_groups
from ._host import pow2_at_least as _pow2
from ._triton_common import pick, pick_row, selection, shrink_all_slots, sum_partials

__all__ = ["lora_decode_add_", "lora_decode_add_reference"]


def lora_decode_add_reference(y, x, lora_A, lora_B, idx, weight, scaling):
    """y += s Σ_k w_tk B[idx_tk] A[idx_tk] x_(t,k), fp32 math; returns y."""
    xk = x.float() if x.dim() == 3 else x.float()[:, None].expand(-1, idx.shape[1], -1)
    h = torch.einsum("tkrd,tkd->tkr", lora_A[idx].float(), xk)
    d = torch.einsum("tkor,tkr->to", lora_B[idx].float(), h * weight.float()[..., None])
    y.copy_((y.float() + scaling * d).to(y.dtype))
    return y


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
            e = pick(sel_e, kk, k).to(tl.int64)
            b = tl.load(b_ptr + e * OUT * R + cols[:, None] * R + rr[None, :],
                        mask=live[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += pick(sel_w, kk, k) * tl.sum(b * pick_row(z, kk, k)[None, :], axis=1)
        acc = scaling * acc
        if HAS_Y:
            acc += tl.load(y_ptr + t * OUT + cols, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * OUT + cols, acc.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _lora_add_kernel(
    y_ptr, out_ptr, x_ptr, a_ptr, b_ptr, idx_ptr, w_ptr, IN, OUT, R, K, scaling, cols_per_group, x_tok_stride,
    x_slot_stride, ROUTED: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    sel_e, sel_w = selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)
    z = shrink_all_slots(x_ptr, a_ptr, sel_e, t, IN, R, K, x_tok_stride, x_slot_stride, KP=KP, RP=RP,
                         BLOCK_D=BLOCK_D)
    _expand_cols(y_ptr, out_ptr, b_ptr, z, sel_e, sel_w, t, OUT, R, K, scaling, grp * cols_per_group,
                 cols_per_group, HAS_Y=True, KP=KP, RP=RP, BLOCK_N=BLOCK_N)


# ---- split (two-launch) form, for CUDA graphs ----------------------------------------------------

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
    sel_e, _ = selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)  # the weights are the expand's job
    for k in tl.static_range(KP):
        e = pick(sel_e, kk, k).to(tl.int64)
        live = dmask & ((dd * 0 + k) < K)
        xv = tl.load(x_ptr + t * x_tok_stride + k * x_slot_stride + dd, mask=live, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + e * R * IN + rr[:, None] * IN + dd[None, :], mask=rmask[:, None] & live[None, :],
                    other=0.0).to(tl.float32)
        tl.store(part_ptr + ((t * KP + k) * RP + rr) * NCH + c, tl.sum(a * xv[None, :], axis=1))


@triton.jit
def _expand_partial_kernel(y_ptr, out_ptr, b_ptr, idx_ptr, w_ptr, part_ptr, OUT, R, K, NCH, scaling,
                           cols_per_group, ROUTED: tl.constexpr, HAS_Y: tl.constexpr, KP: tl.constexpr,
                           RP: tl.constexpr, NCHP: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    grp = tl.program_id(1)
    sel_e, sel_w = selection(idx_ptr, w_ptr, t, K, ROUTED=ROUTED, KP=KP)
    z = sum_partials(part_ptr, t, NCH, ROWS=KP, RP=RP, NCHP=NCHP)
    _expand_cols(y_ptr, out_ptr, b_ptr, z, sel_e, sel_w, t, OUT, R, K, scaling, grp * cols_per_group,
                 cols_per_group, HAS_Y=HAS_Y, KP=KP, RP=RP, BLOCK_N=BLOCK_N)


backend.require_same_backend(_expand_partial_kernel)  # TRITON_INTERPRET unchanged since backend's import


def lora_decode_add_(y, x, lora_A, lora_B, idx, weight, scaling, block_n: int | None = None,
                     block_d: int | None = None, num_warps: int | None = None, out=None, programs: int | None = None,
                     split: bool = False, chunk: int | None = None):
    """y (T, OUT) + s Σ_k w_tk B[idx_tk] A[idx_tk] x_(t,k), written into ``out`` (default: y
    itself, in place); returns the tensor written. Triton version of ``lora_decode_add_reference``.

    x is (T, IN) shared by the slots or (T, K, IN) per slot. With ``idx is None`` it is plain
    LoRA: A (R, IN) or (1, R, IN), B (OUT, R) or (1, OUT, R), K = 1 and weight 1 (``weight`` is
    ignored). ``split=True`` is the two-launch form for CUDA graphs (shrink over ``chunk``-wide
    slices of x, then expand). ``y=None`` (split only) writes the delta alone into ``out``
    (T, OUT), e.g. fp32: ops.py computes it beside the frozen GEMM and leaves the add to the
    compiled graph. Tiles left None come from ``tiles.lookup(x.device)`` (the split form's by
    token count); ``block_d`` is the one-launch form's IN block, ``chunk`` the split form's."""
    backend.check_device(x, "lora_decode_add_")
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
    row = tiles.lookup(x.device)
    cfg = tiles.for_tokens(row["lora_decode_split"], T) if split else row["lora_decode"]
    block_n = cfg["block_n"] if block_n is None else block_n
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    idx_arg = idx.contiguous() if routed else out  # dummies never read when not routed
    w_arg = weight.contiguous() if routed else out
    G, per = column_groups(T, OUT, block_n, x.device, programs, split)
    KP, RP, xs = _pow2(K, 1), _pow2(R, 16), (K * IN if per_slot else IN, IN if per_slot else 0)
    if split:
        chunk = cfg["chunk"] if chunk is None else chunk
        nch = cdiv(IN, chunk)
        part = torch.empty(T, KP, RP, nch, dtype=torch.float32, device=out.device)
        x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()
        _shrink_partial_kernel[(T, nch)](x, lora_A, idx_arg, w_arg, part, IN, R, K, nch, *xs, ROUTED=routed, KP=KP,
                                         RP=RP, CHUNK=chunk, num_warps=cfg["shrink_warps"])
        _expand_partial_kernel[(T, G)](y, out, lora_B, idx_arg, w_arg, part, OUT, R, K, nch, float(scaling), per,
                                       ROUTED=routed, HAS_Y=has_y, KP=KP, RP=RP, NCHP=_pow2(nch, 2),
                                       BLOCK_N=block_n, num_warps=num_warps)
        return out
    _lora_add_kernel[(T, G)](
        y, out, x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), idx_arg, w_arg,
        IN, OUT, R, K, float(scaling), per, *xs,
        ROUTED=routed, KP=KP, RP=RP, BLOCK_D=cfg["block_d"] if block_d is None else block_d, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out
