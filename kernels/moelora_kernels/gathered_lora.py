"""Gathered (unmerged) LoRA experts: y = sum_k w_tk * s * B[idx_tk] @ (A[idx_tk] @ x_t).

T tokens, E experts with LoRA factors ``lora_A`` [E, R, IN] and ``lora_B`` [E, OUT, R],
scaling s; every token t routes to K experts ``idx`` [T, K] with weights ``weight`` [T, K].

- ``x`` is [T, IN] (one input shared by the K slots: LoRA-Switch linears, MixLoRA gate/up) or
  [T, K, IN] (one input per slot: MixLoRA down projection on each expert's own hidden).
- ``weight`` given -> y [T, OUT], the weighted sum over slots; ``weight=None`` -> y [T, K, OUT],
  one unweighted delta per slot (MixLoRA gate/up deltas taken before the activation).

Accumulation is fp32, the output has ``x.dtype``. Three public entry points:
``gathered_lora_reference`` (eager torch, the ground truth), ``gathered_lora`` (Triton) and
``GatheredLoraFunction`` (its autograd Function).

Kernel layout (ideas from Punica SGMV/BGMV and vLLM's lora_shrink/lora_expand, not their code):
shrink  h[t, k] = A[idx_tk] @ x_(t,k)        -> fp32 partials [SPLIT, T*K, R_PAD]
expand  y = s * sum_k w_tk B[idx_tk] @ h[t, k] (or one row per slot), partials summed on load
Two implementations of each, picked from shapes only (never from routing, so no host sync and
a fixed launch count):
- "gather" (decode, T <= 32): one program per slot (shrink, split over IN so a single token
  still fills the GPU) or per output row x column block (expand); it reads only the K chosen
  experts' factors, which is what decode pays for.
- "tile" (training / prefill, few experts): token tiles on tensor cores, no sort. The shrink multiplies a
  token tile by ALL experts' A at once ([BM, IN] @ [IN, E*R]) and keeps each slot's rank block;
  the expand builds a one-hot [BM, E*R] matrix holding w*h in the chosen expert's block and
  multiplies it by all experts' B. That wastes E/K in FLOPs but stays memory-bound while
  E*R <= 256 (H100 ridge ~300 FLOP/byte), reads x once for all K slots, needs no sort/atomics
  and fuses the weighted sum over slots.
- "segment" (prefill / training above 64 tokens, many experts: E*R > 256, e.g. a serving step's
  64 adapter positions or a mixed MixLoRA step's virtual experts): the slots sorted by expert on
  the device (``segments``: sort + searchsorted, no host sync), one program per tile of BM slots
  of one expert on tensor cores, reading that expert's factors once per tile (Punica's SGMV,
  vLLM's lora_shrink / lora_expand). The grid is a device-built list of the tiles, bounded by
  cdiv(T*K, BM) + E + 1 programs (the rest return at once), so it depends on shapes only. A
  caller running many ops over one routing sorts once (``gathered_lora(segments=)``). Before it,
  a wide step took "gather" (CUDA cores, the factors read per token): H100, 7B shape, 64
  positions: a 2048-token serving prefill step 409 ms vs the base's 109 ms for 1184 tokens.
Backward: dh = B^T g via the shrink, dx via the expand with A^T (Triton), dA / dB as one cuBLAS
GEMM over a one-hot matrix (deterministic, no atomics), dweight in torch.
Launch tiles: ``tiles.lookup(device)["gathered_lora"]``; the shrink is split over IN until about
two waves of programs cover the device's SMs (``backend.sm_count``).

Routing indices are not range-checked on CUDA (that would need a host sync): an index outside
[0, E) makes its slot contribute zero in the Triton path; the reference's gather raises a
device-side assert. On CPU both functions raise ValueError.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from . import backend, tiles
from ._host import cdiv
from ._host import pow2_at_least as _pow2

__all__ = ["gathered_lora_reference", "gathered_lora", "GatheredLoraFunction", "segments", "path_for"]

Impl = Literal["auto", "gather", "tile", "segment"]

DECODE_MAX_TOKENS = 32  # at or below: "gather" kernels (decode); above: "tile" kernels
# Too wide for "tile": "gather" up to this many tokens (the serving engine's CUDA-graph buckets,
# where gather was measured), "segment" above (prefill: the sort pays for itself)
SEGMENT_MIN_TOKENS = 65
TILE_MAX_COLS = 256  # E_pad * R_pad beyond this makes the all-experts tile too wide
# Block sizes, warps and the IN split: tiles.lookup(device)["gathered_lora"] (tests shrink the IN
# chunks there to exercise the split).


def _alloc(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the kernels fill; tests swap it for a NaN-filled one to prove full coverage."""
    return torch.empty(shape, device=device, dtype=dtype)


# --------------------------------------------------------------------------- reference


def gathered_lora_reference(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Eager ground truth of the gathered LoRA-experts op (differentiable, no host sync).

    Every expert's rank-R projection is computed (cheap: R is small) and masked to the chosen
    experts, which avoids materialising A[idx] / B[idx] ([T, K, R, IN]: gigabytes at training
    shapes) and any data-dependent indexing.
    """
    T, K, _, _, E, R, per_slot = _check_inputs(x, lora_A, lora_B, idx, weight)
    cdt = torch.promote_types(x.dtype, torch.float32)
    A, B = lora_A.to(cdt), lora_B.to(cdt)
    if per_slot:
        h_all = torch.einsum("tki,eri->tker", x.to(cdt), A)  # (T, K, E, R)
    else:
        h_all = torch.einsum("ti,eri->ter", x.to(cdt), A).unsqueeze(1).expand(T, K, E, R)
    # Comparison instead of F.one_hot: one_hot validates the range with a host sync on CUDA.
    coef = (idx.unsqueeze(-1) == torch.arange(E, device=idx.device)).to(cdt) * scaling  # (T,K,E)
    if weight is not None:
        coef = coef * weight.to(cdt).unsqueeze(-1)
    g = h_all * coef.unsqueeze(-1)  # (T, K, E, R): rank block of the chosen expert only
    y = torch.einsum("tker,eor->to" if weight is not None else "tker,eor->tko", g, B)
    return y.to(x.dtype)


def _check_inputs(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int, bool]:
    """Validate shapes/dtypes (sync-free); return (T, K, IN, OUT, E, R, x_per_slot)."""
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"lora_A must be [E, R, IN] and lora_B [E, OUT, R]; got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    E, R, IN = lora_A.shape
    OUT = lora_B.shape[1]
    if lora_B.shape[0] != E or lora_B.shape[2] != R:
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} does not match lora_A {tuple(lora_A.shape)}: "
            f"expected [{E}, OUT, {R}]"
        )
    if idx.dim() != 2:
        raise ValueError(f"idx must be [T, K], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    T, K = idx.shape
    if x.dim() == 2:
        per_slot = False
        ok = x.shape == (T, IN)
    elif x.dim() == 3:
        per_slot = True
        ok = x.shape == (T, K, IN)
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"x must be [T, IN] = [{T}, {IN}] or [T, K, IN] = [{T}, {K}, {IN}] "
            f"(T, K from idx, IN from lora_A); got {tuple(x.shape)}"
        )
    if not (x.dtype == lora_A.dtype == lora_B.dtype) or not x.is_floating_point():
        raise TypeError(
            f"x, lora_A, lora_B must share one floating dtype; got {x.dtype}, "
            f"{lora_A.dtype}, {lora_B.dtype}"
        )
    if weight is not None:
        if weight.shape != (T, K):
            raise ValueError(f"weight must be [T, K] = [{T}, {K}], got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
    tensors = [x, lora_A, lora_B, idx] + ([weight] if weight is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")
    # A range check costs a host sync on CUDA, so it only runs where it is free (and not while
    # torch.compile traces: a data-dependent .item() would break the graph there).
    if idx.device.type == "cpu" and idx.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"idx values must lie in [0, {E}), got min {lo}, max {hi}")
    return T, K, IN, OUT, E, R, per_slot


# --------------------------------------------------------------------------- kernels


@triton.jit
def _slot_expert(idx_ptr, slot, mask, K, s_it, s_ik):
    """Expert id of flat slot t*K+k, -1 where masked."""
    return tl.load(idx_ptr + (slot // K) * s_it + (slot % K) * s_ik, mask=mask, other=-1).to(tl.int32)


# The IN-split (``_split``) follows the token count, so the arguments it sets (CHUNKS_PER_SPLIT,
# SPLIT) are not specialised (Triton would compile anew when one becomes 1 or a multiple of 16) and
# the expand's SPLIT_PAD is the largest split's, not this one's: a launch's compiled variant then
# depends on the token count only through its divisibility by 16, so two warm-up sizes (a multiple
# of 16 and one more) compile every prefill size. Before, a serving run's first prefill steps of
# new sizes compiled variants inside timed steps (H100, 7B shape, 1000 adapters: a 2.5 s step).
@triton.jit(do_not_specialize=["CHUNKS_PER_SPLIT"])
def _shrink_gather_kernel(
    x_ptr, a_ptr, idx_ptr, h_ptr,
    S, K, E, R, IN, CHUNKS_PER_SPLIT,
    s_xt, s_xk, s_xi, s_ae, s_ar, s_ai, s_it, s_ik,
    R_PAD: tl.constexpr, BK: tl.constexpr,
):
    # One program per (slot, IN-split): a [R_PAD, BK] tile of the chosen expert's A times a
    # [BK] slice of x, reduced on CUDA cores (M = 1 rules out tl.dot).
    slot = tl.program_id(0)
    sk = tl.program_id(1)
    e = _slot_expert(idx_ptr, slot, slot < S, K, s_it, s_ik)
    # An out-of-range expert reads no rank rows. (A scalar bool `&` a block mask comes out
    # int32 in the interpreter, so fold the scalar test into the row limit instead.)
    r_lim = tl.where((e >= 0) & (e < E), R, 0)
    rr = tl.arange(0, R_PAD)
    x_row = x_ptr + (slot // K).to(tl.int64) * s_xt + (slot % K) * s_xk
    a_rows = a_ptr + e.to(tl.int64) * s_ae + rr[:, None] * s_ar
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    for ci in range(CHUNKS_PER_SPLIT):
        offs = (sk * CHUNKS_PER_SPLIT + ci) * BK + tl.arange(0, BK)
        in_mask = offs < IN
        xv = tl.load(x_row + offs * s_xi, mask=in_mask, other=0.0).to(tl.float32)
        av = tl.load(a_rows + offs[None, :] * s_ai, mask=(rr[:, None] < r_lim) & in_mask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    # Padded rank columns are stored as zeros so every element of h is written.
    tl.store(h_ptr + (sk * S + slot) * R_PAD + rr, acc)


@triton.jit
def _all_expert_columns(E, R, R_PAD: tl.constexpr, E_PAD: tl.constexpr):
    """The E_PAD*R_PAD columns of the "tile" kernels: column c stands for expert ce = c // R_PAD,
    rank row cj = c % R_PAD; col_ok masks the padding. Returns (ce, cj, col_ok)."""
    cols = tl.arange(0, E_PAD * R_PAD)
    ce = cols // R_PAD
    cj = cols % R_PAD
    return ce, cj, (ce < E) & (cj < R)


@triton.jit
def _store_slot_block(h_ptr, acc, rows, row_mask, k, ce, cj, idx_ptr, K, E, S, sk, s_it, s_ik,
                      R_PAD: tl.constexpr):
    # acc holds x @ A_e^T for every expert e; keep the R_PAD columns of the slot's own expert.
    # Out-of-range experts store zeros (through expert 0's columns) so h is fully written.
    slot = rows * K + k
    e = _slot_expert(idx_ptr, slot, row_mask, K, s_it, s_ik)
    e_ok = (e >= 0) & (e < E)
    e_use = tl.where(e_ok, e, 0)
    val = tl.where(e_ok[:, None], acc, 0.0)
    sel = row_mask[:, None] & (ce[None, :] == e_use[:, None])
    tl.store(h_ptr + (sk * S + slot)[:, None] * R_PAD + cj[None, :], val, mask=sel)


@triton.jit(do_not_specialize=["CHUNKS_PER_SPLIT"])  # see _shrink_gather_kernel
def _shrink_tile_kernel(
    x_ptr, a_ptr, idx_ptr, h_ptr,
    T, K, E, R, IN, CHUNKS_PER_SPLIT,
    s_xt, s_xk, s_xi, s_ae, s_ar, s_ai, s_it, s_ik,
    K_X: tl.constexpr, K_SLOTS: tl.constexpr, X_PER_SLOT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
):
    # A token tile times all experts' A at once: [BM, BK] @ [BK, E_PAD*R_PAD] on tensor cores.
    pid_m = tl.program_id(0)
    sk = tl.program_id(1)
    S = T * K
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < T
    ce, cj, col_ok = _all_expert_columns(E, R, R_PAD, E_PAD)
    rk = tl.arange(0, BK)
    a_cols = a_ptr + ce[None, :].to(tl.int64) * s_ae + cj[None, :] * s_ar
    for kx in tl.static_range(K_X):  # K_X = K for per-slot x, 1 when x is shared by the slots
        x_rows = x_ptr + rows[:, None].to(tl.int64) * s_xt + kx * s_xk
        acc = tl.zeros((BM, E_PAD * R_PAD), dtype=tl.float32)
        for ci in range(CHUNKS_PER_SPLIT):
            offs = (sk * CHUNKS_PER_SPLIT + ci) * BK + rk
            in_mask = offs < IN
            xv = tl.load(x_rows + offs[None, :] * s_xi, mask=row_mask[:, None] & in_mask[None, :], other=0.0)
            av = tl.load(a_cols + offs[:, None] * s_ai, mask=col_ok[None, :] & in_mask[:, None], other=0.0)
            if COMPUTE_F32:
                acc += tl.dot(xv.to(tl.float32), av.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xv, av)  # 16-bit operands, fp32 accumulator
        if X_PER_SLOT:
            _store_slot_block(h_ptr, acc, rows, row_mask, kx, ce, cj, idx_ptr, K, E, S, sk, s_it, s_ik, R_PAD)
        else:
            for k in tl.static_range(K_SLOTS):
                _store_slot_block(h_ptr, acc, rows, row_mask, k, ce, cj, idx_ptr, K, E, S, sk, s_it, s_ik,
                                  R_PAD)


@triton.jit
def _onehot_rows(
    h_ptr, idx_ptr, w_ptr, rows, row_mask, ce, cj, col_ok,
    K, S, SPLIT, s_it, s_ik, s_wt, s_wk,
    K_INNER: tl.constexpr, R_PAD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr,
):
    # G[m, c] = sum over the row's slots of w * h[slot, c % R_PAD] if the slot chose expert
    # c // R_PAD, else 0. A row is a token (K_INNER = K: the slots are summed, as for a
    # weighted output or a shared input) or a single slot (K_INNER = 1).
    g = tl.zeros((BM, BC), dtype=tl.float32)
    for kk in tl.static_range(K_INNER):
        slot = rows * K_INNER + kk
        e = _slot_expert(idx_ptr, slot, row_mask, K, s_it, s_ik)
        sel = row_mask[:, None] & col_ok[None, :] & (ce[None, :] == e[:, None])
        h_off = slot[:, None] * R_PAD + cj[None, :]
        hv = tl.load(h_ptr + h_off, mask=sel, other=0.0)
        for sk in range(1, SPLIT):  # IN-split partials of the shrink
            hv += tl.load(h_ptr + sk * S * R_PAD + h_off, mask=sel, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + (slot // K) * s_wt + (slot % K) * s_wk, mask=row_mask, other=0.0)
            hv = hv * w.to(tl.float32)[:, None]
        g += hv
    return g


@triton.jit(do_not_specialize=["SPLIT"])  # see _shrink_gather_kernel
def _expand_tile_kernel(
    h_ptr, b_ptr, idx_ptr, w_ptr, y_ptr,
    M, K, E, R, OUT, SPLIT, scaling,
    s_be, s_bo, s_br, s_it, s_ik, s_wt, s_wk, s_ym, s_yo,
    K_INNER: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
):
    # One dot per tile: one-hot [BM, E_PAD*R_PAD] (w*h in the chosen expert's block, summed over
    # the row's slots) @ all experts' B [E_PAD*R_PAD, BN]. The weighted sum over k is fused.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    S = M * K_INNER  # number of slots
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < M
    ce, cj, col_ok = _all_expert_columns(E, R, R_PAD, E_PAD)
    g = _onehot_rows(h_ptr, idx_ptr, w_ptr, rows, row_mask, ce, cj, col_ok, K, S, SPLIT,
                     s_it, s_ik, s_wt, s_wk, K_INNER, R_PAD, HAS_WEIGHT, BM, E_PAD * R_PAD)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < OUT
    bv = tl.load(b_ptr + ce[:, None].to(tl.int64) * s_be + cj[:, None] * s_br + rn[None, :] * s_bo,
                 mask=col_ok[:, None] & n_mask[None, :], other=0.0)
    if COMPUTE_F32:
        acc = tl.dot(g, bv.to(tl.float32), input_precision="ieee")
    else:
        # h rounded to the weights' 16-bit dtype for the tensor cores, as in PEFT / vLLM.
        acc = tl.dot(g.to(bv.dtype), bv)
    acc = acc * scaling
    y_off = rows[:, None].to(tl.int64) * s_ym + rn[None, :] * s_yo
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["SPLIT"])  # see _shrink_gather_kernel
def _expand_gather_kernel(
    h_ptr, b_ptr, idx_ptr, w_ptr, y_ptr,
    M, K, E, R, OUT, SPLIT, scaling,
    s_be, s_bo, s_br, s_it, s_ik, s_wt, s_wk, s_ym, s_yo,
    K_INNER: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BN: tl.constexpr, R_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    # One program per (output row, column block): reads only the chosen experts' B rows.
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    S = M * K_INNER  # number of slots
    rr = tl.arange(0, R_PAD)
    rs = tl.arange(0, SPLIT_PAD)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < OUT
    acc = tl.zeros((BN,), dtype=tl.float32)
    for kk in tl.static_range(K_INNER):
        slot = row * K_INNER + kk
        e = _slot_expert(idx_ptr, slot, row < M, K, s_it, s_ik)
        r_lim = tl.where((e >= 0) & (e < E), R, 0)  # see _shrink_gather_kernel
        # All IN-split partials in one [SPLIT_PAD, R_PAD] load: a loop would serialise latency.
        hp = tl.load(h_ptr + (rs[:, None] * S + slot) * R_PAD + rr[None, :], mask=rs[:, None] < SPLIT,
                     other=0.0)
        hv = tl.sum(hp, axis=0)
        if HAS_WEIGHT:
            hv = hv * tl.load(w_ptr + (slot // K) * s_wt + (slot % K) * s_wk).to(tl.float32)
        bv = tl.load(b_ptr + e.to(tl.int64) * s_be + rn[:, None] * s_bo + rr[None, :] * s_br,
                     mask=n_mask[:, None] & (rr[None, :] < r_lim), other=0.0).to(tl.float32)
        acc += tl.sum(bv * hv[None, :], axis=1)
    acc = acc * scaling
    tl.store(y_ptr + row.to(tl.int64) * s_ym + rn * s_yo, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


# "segment": slots sorted by expert (``segments``); the grid's programs are the tiles of BM slots
# of one expert, listed per program in ``block_e`` (its expert; > E: no tile, return) and ``meta``
# ([3, E+1]: where each expert's slots start in ``order``, how many, the end of its tiles in the
# program list). Out-of-range experts form bucket E, whose programs store zeros, so every element
# of h and y is written.
@triton.jit
def _segment_tile(order_ptr, block_e_ptr, meta_ptr, E, BM: tl.constexpr):
    """(expert, its slots in this tile, their mask) of this program; expert > E: none."""
    pid = tl.program_id(0)
    e = tl.load(block_e_ptr + pid).to(tl.int32)
    ec = tl.minimum(e, E)
    start = tl.load(meta_ptr + ec)
    n = tl.load(meta_ptr + (E + 1) + ec)
    tiles_before = tl.load(meta_ptr + 2 * (E + 1) + ec) - (n + BM - 1) // BM
    j = (pid - tiles_before) * BM + tl.arange(0, BM)
    # (a scalar bool `&` a block mask comes out int32 in the interpreter: fold it into the limit)
    jm = j < tl.where(e <= E, n, 0)
    slot = tl.load(order_ptr + start + j, mask=jm, other=0)
    return e, slot, jm


@triton.jit(do_not_specialize=["S", "CHUNKS_PER_SPLIT"])
def _shrink_segment_kernel(
    x_ptr, a_ptr, order_ptr, block_e_ptr, meta_ptr, h_ptr,
    S, K, E, R, IN, CHUNKS_PER_SPLIT,
    s_xt, s_xk, s_xi, s_ae, s_ar, s_ai,
    BM: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, COMPUTE_F32: tl.constexpr,
):
    # [BM slots of expert e, BK] @ A_e^T [BK, R_PAD] on tensor cores, over this split's IN chunks.
    sk = tl.program_id(1)
    e, slot, jm = _segment_tile(order_ptr, block_e_ptr, meta_ptr, E, BM)
    if e > E:
        return
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if e < E:
        x_rows = x_ptr + (slot // K).to(tl.int64) * s_xt + (slot % K) * s_xk
        a_cols = a_ptr + e.to(tl.int64) * s_ae + rr[None, :] * s_ar
        rk = tl.arange(0, BK)
        for ci in range(CHUNKS_PER_SPLIT):
            offs = (sk * CHUNKS_PER_SPLIT + ci) * BK + rk
            in_mask = offs < IN
            xv = tl.load(x_rows[:, None] + offs[None, :] * s_xi, mask=jm[:, None] & in_mask[None, :], other=0.0)
            av = tl.load(a_cols + offs[:, None] * s_ai, mask=(rr[None, :] < R) & in_mask[:, None], other=0.0)
            if COMPUTE_F32:
                acc += tl.dot(xv.to(tl.float32), av.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xv, av)
    tl.store(h_ptr + (sk * S + slot)[:, None].to(tl.int64) * R_PAD + rr[None, :], acc, mask=jm[:, None])


@triton.jit(do_not_specialize=["S", "SPLIT"])
def _expand_segment_kernel(
    h_ptr, b_ptr, order_ptr, block_e_ptr, meta_ptr, w_ptr, y_ptr,
    S, K, E, R, OUT, SPLIT, scaling,
    s_be, s_bo, s_br, s_wt, s_wk, s_ys, s_yo,
    HAS_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R_PAD: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
):
    # One row per slot: s * w * h[slot] [BM, R_PAD] @ B_e^T [R_PAD, BN] (the launcher sums a
    # token's K slots when the output is per token).
    pid_n = tl.program_id(1)
    e, slot, jm = _segment_tile(order_ptr, block_e_ptr, meta_ptr, E, BM)
    if e > E:
        return
    rr = tl.arange(0, R_PAD)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < OUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if e < E:
        h_off = slot[:, None].to(tl.int64) * R_PAD + rr[None, :]
        hv = tl.load(h_ptr + h_off, mask=jm[:, None], other=0.0)
        for sk in range(1, SPLIT):  # IN-split partials of the shrink
            hv += tl.load(h_ptr + sk * S * R_PAD + h_off, mask=jm[:, None], other=0.0)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + (slot // K) * s_wt + (slot % K) * s_wk, mask=jm, other=0.0)
            hv = hv * w.to(tl.float32)[:, None]
        bv = tl.load(b_ptr + e.to(tl.int64) * s_be + rr[:, None] * s_br + rn[None, :] * s_bo,
                     mask=(rr[:, None] < R) & n_mask[None, :], other=0.0)
        if COMPUTE_F32:
            acc = tl.dot(hv, bv.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(hv.to(bv.dtype), bv)  # h rounded to the 16-bit dtype, as the tile path
        acc = acc * scaling
    y_off = slot[:, None].to(tl.int64) * s_ys + rn[None, :] * s_yo
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=jm[:, None] & n_mask[None, :])


backend.require_same_backend(_expand_gather_kernel)  # TRITON_INTERPRET unchanged since backend's import


# --------------------------------------------------------------------------- launchers


def _r_pad(r: int) -> int:
    return _pow2(r, 16)  # tl.dot needs every dim >= 16


def _compute_f32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 arithmetic is broken, so every kernel upcasts loads to fp32 there.
    return backend.interpreted() or dtype == torch.float32 or dtype == torch.float64


def _pick_path(T: int, E: int, R: int, impl: Impl) -> str:
    if impl not in ("auto", "gather", "tile", "segment"):
        raise ValueError(f"impl must be 'auto', 'gather', 'tile' or 'segment', got {impl!r}")
    cols = _pow2(E) * _r_pad(R)
    if impl == "auto":
        if T <= DECODE_MAX_TOKENS:
            return "gather"
        if cols <= TILE_MAX_COLS:
            return "tile"
        return "segment" if T >= SEGMENT_MIN_TOKENS else "gather"
    if impl == "tile" and cols > TILE_MAX_COLS:
        raise ValueError(f"impl='tile' needs next_pow2(E) * R_pad <= {TILE_MAX_COLS}, got {cols}")
    return impl


def path_for(T: int, E: int, R: int) -> str:
    """The path ``gathered_lora(impl="auto")`` takes for T tokens over E experts of rank R."""
    return _pick_path(T, E, R, "auto")


def _split(n_chunks: int, programs: int, device: torch.device, cfg: dict) -> tuple[int, int]:
    """(SPLIT, chunks per split) so that programs * SPLIT reaches about ``cfg["waves"]`` waves
    over the SMs of ``device``, at most ``cfg["max_split"]``."""
    target = cfg["waves"] * backend.sm_count(device)
    split = max(1, min(n_chunks, cfg["max_split"], cdiv(target, programs)))
    per = cdiv(n_chunks, split)
    return cdiv(n_chunks, per), per


def segments(idx: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "segment" path's slot order for routing ``idx`` [T, K] over E experts: (order [T*K]:
    the flat slots sorted by expert, block_e [NB]: the expert of each program's tile of BM slots
    (> E past the last tile), meta [3, E+1]: per expert, where its slots start in ``order``, how
    many, and the end of its tiles in the program list; bucket E holds the out-of-range slots).
    NB = cdiv(T*K, BM) + E + 1 bounds the tile count, so the grid depends on shapes only. Device
    ops only: no host sync (``torch.bincount`` would size its output from the max on the host),
    graph-capturable. A caller that runs many ops over one routing (a serving step's linears)
    computes it once and passes it as ``gathered_lora(..., segments=)``."""
    bm = tiles.lookup(idx.device)["gathered_lora"]["segment_bm"]
    S = idx.numel()
    bucket = (idx.reshape(-1).clamp(-1, E) % (E + 1)).to(torch.int32)  # -1 and >= E -> bucket E
    sorted_b, order = torch.sort(bucket, stable=True)
    edges = torch.searchsorted(sorted_b, torch.arange(E + 2, device=idx.device, dtype=torch.int32))
    count = edges[1:] - edges[:-1]
    tile_end = torch.cumsum((count + bm - 1) // bm, 0)
    blocks = torch.arange(cdiv(S, bm) + E + 1, device=idx.device, dtype=tile_end.dtype)
    block_e = torch.searchsorted(tile_end, blocks, right=True)
    return order, block_e, torch.stack([edges[:-1], count, tile_end])


def _shrink(x3: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, path: str, segs=None) -> torch.Tensor:
    """h partials [SPLIT, T*K, R_pad] (fp32) of h[t, k] = a[idx_tk] @ x3[t, k or 0].

    x3 is [T, 1, IN] (shared by the slots) or [T, K, IN]; a is [E, R, IN] with any strides
    (the backward passes B^T as a view); ``segs``: ``segments(idx, E)`` (path "segment").
    """
    T, kx, IN = x3.shape
    E, R, _ = a.shape
    K = idx.shape[1]
    s_xk = x3.stride(1) if kx == K else 0
    r_pad, S = _r_pad(R), T * K
    common = (E, R, IN)
    strides = (x3.stride(0), s_xk, x3.stride(2), *a.stride(), idx.stride(0), idx.stride(1))
    f32 = _compute_f32(x3.dtype)
    dev = x3.device
    cfg = tiles.lookup(dev)["gathered_lora"]
    if path == "gather":
        bk = min(cfg["gather_bk"], _pow2(IN, 16))
        split, per = _split(cdiv(IN, bk), S, dev, cfg)
        h = _alloc((split, S, r_pad), dev, torch.float32)
        _shrink_gather_kernel[(S, split)](
            x3, a, idx, h, S, K, *common, per, *strides, R_PAD=r_pad, BK=bk, num_warps=cfg["gather_shrink_warps"]
        )
        return h
    if path == "segment":
        segs = segments(idx, E) if segs is None else segs
        bm, bk = cfg["segment_bm"], min(cfg["segment_bk"], _pow2(IN, 16))
        split, per = _split(cdiv(IN, bk), cdiv(S, bm), dev, cfg)
        h = _alloc((split, S, r_pad), dev, torch.float32)
        _shrink_segment_kernel[(segs[1].shape[0], split)](
            x3, a, *segs, h, S, K, *common, per, *strides[:6],
            BM=bm, BK=bk, R_PAD=r_pad, COMPUTE_F32=f32, num_warps=cfg["segment_shrink_warps"],
        )
        return h
    e_pad = _pow2(E)
    bm = cfg["tile_bm"] if e_pad * r_pad <= 128 else cfg["tile_bm_wide"]
    bk = min(cfg["tile_bk"], _pow2(IN, 16))
    n_m = cdiv(T, bm)
    split, per = _split(cdiv(IN, bk), n_m, dev, cfg)
    h = _alloc((split, S, r_pad), dev, torch.float32)
    per_slot = kx == K and K > 1
    _shrink_tile_kernel[(n_m, split)](
        x3, a, idx, h, T, K, *common, per, *strides,
        K_X=K if per_slot else 1, K_SLOTS=K, X_PER_SLOT=per_slot,
        BM=bm, BK=bk, R_PAD=r_pad, E_PAD=e_pad, COMPUTE_F32=f32, num_warps=cfg["tile_shrink_warps"],
    )
    return h


def _expand(
    h: torch.Tensor,
    b: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None,
    scaling: float,
    token_rows: bool,
    out_dtype: torch.dtype,
    path: str,
    segs=None,
) -> torch.Tensor:
    """y = s * b[idx] @ h (times weight): [T, OUT] summed over slots if token_rows, else [T, K, OUT].

    b is [E, OUT, R] with any strides (the backward passes A^T as a view).
    """
    T, K = idx.shape
    E, OUT, R = b.shape
    if path == "segment":
        return _expand_segment(h, b, idx, weight, scaling, token_rows, out_dtype, segs)
    k_inner, M = (K, T) if token_rows else (1, T * K)
    y = _alloc((T, OUT) if token_rows else (T, K, OUT), h.device, out_dtype)
    y2 = y.view(M, OUT)
    w = weight if weight is not None else h  # dummy pointer, never read without HAS_WEIGHT
    w_strides = (weight.stride(0), weight.stride(1)) if weight is not None else (0, 0)
    r_pad, split = _r_pad(R), h.shape[0]
    cfg = tiles.lookup(h.device)["gathered_lora"]
    args = (h, b, idx, w, y2, M, K, E, R, OUT, split, float(scaling), b.stride(0), b.stride(1),
            b.stride(2), idx.stride(0), idx.stride(1), *w_strides, y2.stride(0), y2.stride(1))
    if path == "gather":
        bn = min(cfg["gather_bn"], _pow2(OUT, 16))
        _expand_gather_kernel[(M, cdiv(OUT, bn))](
            *args, K_INNER=k_inner, HAS_WEIGHT=weight is not None, BN=bn, R_PAD=r_pad,
            SPLIT_PAD=_pow2(max(split, cfg["max_split"])), num_warps=cfg["gather_expand_warps"],
        )
        return y
    e_pad = _pow2(E)
    bm, bn = cfg["tile_expand_bm"], min(cfg["tile_expand_bn"], _pow2(OUT, 16))
    _expand_tile_kernel[(cdiv(M, bm), cdiv(OUT, bn))](
        *args, K_INNER=k_inner, HAS_WEIGHT=weight is not None, BM=bm, BN=bn, R_PAD=r_pad,
        E_PAD=e_pad, COMPUTE_F32=_compute_f32(b.dtype), num_warps=cfg["tile_expand_warps"],
    )
    return y


def _expand_segment(h, b, idx, weight, scaling, token_rows, out_dtype, segs) -> torch.Tensor:
    """``_expand`` of the "segment" path: one output row per slot; a per-token output of K > 1
    slots is their fp32 rows summed (the programs of a token's slots differ, so they cannot
    accumulate into one row without atomics)."""
    T, K = idx.shape
    E, OUT, R = b.shape
    S = T * K
    segs = segments(idx, E) if segs is None else segs
    summed = token_rows and K > 1
    y = _alloc((S, OUT) if summed else ((T, OUT) if token_rows else (T, K, OUT)), h.device,
               torch.float32 if summed else out_dtype)
    y2 = y.view(S, OUT)
    w = weight if weight is not None else h  # dummy pointer, never read without HAS_WEIGHT
    w_strides = (weight.stride(0), weight.stride(1)) if weight is not None else (0, 0)
    cfg = tiles.lookup(h.device)["gathered_lora"]
    bm, bn = cfg["segment_bm"], min(cfg["segment_expand_bn"], _pow2(OUT, 16))
    _expand_segment_kernel[(segs[1].shape[0], cdiv(OUT, bn))](
        h, b, *segs, w, y2, S, K, E, R, OUT, h.shape[0], float(scaling), *b.stride(), *w_strides,
        y2.stride(0), y2.stride(1), HAS_WEIGHT=weight is not None, BM=bm, BN=bn, R_PAD=_r_pad(R),
        COMPUTE_F32=_compute_f32(b.dtype), num_warps=cfg["segment_expand_warps"],
    )
    return y.view(T, K, OUT).sum(1).to(out_dtype) if summed else y


def _outer_into(
    dest: torch.Tensor,
    h: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None,
    scaling: float,
    y3: torch.Tensor,
) -> None:
    """dest[e] = s * sum over slots choosing e of w * h_slot (outer) y_slot; dest is [E, R, N].

    y3 is [T, 1, N] (one row per token, its slots summed) or [T, K, N] (one row per slot).
    dest may be a transposed view (dB is [E, OUT, R]); every element is written.

    One dense GEMM on the tensor cores: G [M, E*R_pad] holds w*h in the chosen expert's block of
    each row (zero elsewhere) and dest = s * G^T @ Y, reduced over all M rows by cuBLAS.
    Deterministic: a token's K experts are distinct, so the scatter that builds G never collides.
    (A Triton kernel that rebuilt G from the IN-split partials inside every output tile took
    0.8 ms per call at 4096 tokens on the H100: 39% of a MixLoRA expert-block training step.)
    """
    T, K = idx.shape
    E, R, N = dest.shape
    r_pad = h.shape[-1]
    hv = h.sum(0).view(T, K, r_pad)  # the shrink's IN-split partials, fp32
    valid = (idx >= 0) & (idx < E)  # an out-of-range expert contributes zero (as in the kernels)
    hv = hv * (valid.unsqueeze(-1) if weight is None else (weight.float() * valid).unsqueeze(-1))
    e = idx.clamp(0, E - 1).unsqueeze(-1).expand(T, K, r_pad)
    if y3.shape[1] == 1 and K > 1:  # one row per token: its slots summed into one one-hot row
        g = hv.new_zeros(T, E, r_pad).scatter_add_(1, e, hv)
        y = y3.reshape(T, N)
    else:  # one row per slot
        g = hv.new_zeros(T * K, E, r_pad).scatter_(1, e.reshape(T * K, 1, r_pad), hv.view(T * K, 1, r_pad))
        y = y3.expand(T, K, N).reshape(T * K, N)
    g = g.view(-1, E * r_pad).to(y.dtype)  # w*h rounded to the 16-bit dtype for the tensor cores
    out = torch.empty(E * r_pad, N, dtype=dest.dtype, device=dest.device)
    torch.addmm(out, g.t(), y.to(dest.dtype), beta=0, alpha=float(scaling), out=out)  # one rounding
    dest.copy_(out.view(E, r_pad, N)[:, :R])


# --------------------------------------------------------------------------- autograd


class GatheredLoraFunction(torch.autograd.Function):
    """Triton forward (shrink + expand); backward: Triton for dx, one cuBLAS GEMM each for dA
    and dB, dweight in torch.

    ``apply(x, lora_A, lora_B, idx, weight, scaling, path, segs=None)`` with path "gather",
    "tile" or "segment" (``segs``: ``segments(idx, E)``, made here when None); inputs are
    assumed validated (``gathered_lora`` does it).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, idx, weight, scaling, path, segs=None):  # noqa: D102
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        if path != "segment":
            segs = None
        elif segs is None:
            segs = segments(idx, lora_A.shape[0])
        h = _shrink(x3, lora_A, idx, path, segs)  # (SPLIT, T*K, R_pad) fp32 partials
        y = _expand(h, lora_B, idx, weight, scaling, weight is not None, x.dtype, path, segs)
        ctx.save_for_backward(x, lora_A, lora_B, idx, weight, h, *(segs or ()))
        ctx.scaling, ctx.path = scaling, path
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, lora_A, lora_B, idx, weight, h, *segs = ctx.saved_tensors
        s, path = ctx.scaling, ctx.path
        segs = tuple(segs) or None
        T, K = idx.shape
        weighted = weight is not None
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        gy3 = gy.unsqueeze(1) if weighted else gy  # a weighted output is shared by the slots
        need_x, need_a, need_b, _, need_w = ctx.needs_input_grad[:5]
        dx = dA = dB = dw = None
        if need_x or need_a or need_w:
            # dh_raw[t, k] = B[idx_tk]^T gy_(t,k): the shrink with B^T viewed as [E, R, OUT].
            dh = _shrink(gy3, lora_B.transpose(1, 2), idx, path, segs)
            if need_x:
                dx = _expand(dh, lora_A.transpose(1, 2), idx, weight, s, x.dim() == 2, x.dtype, path, segs)
            if need_a:
                dA = _alloc(tuple(lora_A.shape), lora_A.device, lora_A.dtype)
                _outer_into(dA, dh, idx, weight, s, x3)
            if need_w:
                # dweight_tk = s * <gy_t, B h_tk> = s * <dh_raw_tk, h_tk>
                dw = (dh.sum(0) * h.sum(0)).sum(-1).mul_(s).view(T, K).to(weight.dtype)
        if need_b:
            dB = _alloc(tuple(lora_B.shape), lora_B.device, lora_B.dtype)
            _outer_into(dB.transpose(1, 2), h, idx, weight, s, gy3)
        return dx, dA, dB, None, dw, None, None, None


def gathered_lora(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor | None = None,
    scaling: float = 1.0,
    *,
    impl: Impl = "auto",
    segments: tuple | None = None,
) -> torch.Tensor:
    """Triton gathered LoRA experts; same contract as ``gathered_lora_reference``, autograd-capable.

    ``impl`` forces the "gather" (decode), "tile" or "segment" (training / prefill) kernels;
    "auto" picks by T and by the width E * R. ``segments``: ``segments(idx, E)`` of this very
    ``idx``, computed once by a caller that launches many ops over one routing (used by the
    "segment" path only; not checked: another routing's gives wrong results).
    No host sync and a launch count that depends on shapes only (2 forward, <= 4 backward
    kernels plus the dweight reduction; the "segment" path adds its sort unless given it).
    """
    T, K, _, _, E, R, _ = _check_inputs(x, lora_A, lora_B, idx, weight)
    backend.check_device(x, "gathered_lora", reference="gathered_lora_reference")
    path = _pick_path(T, E, R, impl)
    if T == 0 or K == 0:  # empty grids cannot launch; the reference handles it without kernels
        return gathered_lora_reference(x, lora_A, lora_B, idx, weight, scaling)
    return GatheredLoraFunction.apply(x, lora_A, lora_B, idx, weight, float(scaling), path, segments)
