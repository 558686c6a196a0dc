"""MixLoRA expert hidden states for decode: one launch for the gate/up deltas, the activation and
the weighted mix over the selected experts.

For T tokens (decode: T <= a few dozen) with K selected experts each:

    g_tk = g0_t + s · B_g[e] (A_g[e] x_t),   u_tk = u0_t + s · B_u[e] (A_u[e] x_t),   e = idx[t, k]
    h_tk = act(g_tk) ⊙ u_tk                  (T, K, F)   -- input of each expert's down delta
    h_mix_t = Σ_k w_tk h_tk                  (T, F)      -- input of the ONE frozen down GEMM

where g0 = W_gate x and u0 = W_up x are the frozen projections computed once for all experts.
Unfused this is ~12 launches per layer (2 shrinks, 2 expands, 2 adds, act, mul, mul, sum...);
at batch-1 decode every launch costs more than its arithmetic, so here it is one.

Grid: (T, cdiv(F, BLOCK_F)). Each program recomputes the rank-R shrink A[e] x_t for its token
(R·D MACs, served from L2 after the first program) instead of writing it out and launching a
second kernel: at decode the launch is the expensive part, not the 2·K·R·D MACs.
``mixlora_expert_hidden_reference`` is the eager ground truth.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2}


def _torch_act(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda v: F.gelu(v, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")


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
def _hidden_kernel(
    x_ptr, g0_ptr, u0_ptr, ag_ptr, bg_ptr, au_ptr, bu_ptr, idx_ptr, w_ptr, h_ptr, hmix_ptr,
    D, FF, R, K, scaling,
    RP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, ACT: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BF,) hidden units of this program
    fmask = cols < FF
    rr = tl.arange(0, RP)
    rmask = rr < R
    g0 = tl.load(g0_ptr + t * FF + cols, mask=fmask, other=0.0).to(tl.float32)
    u0 = tl.load(u0_ptr + t * FF + cols, mask=fmask, other=0.0).to(tl.float32)
    mix = tl.zeros([BLOCK_F], dtype=tl.float32)
    for k in range(K):
        e = tl.load(idx_ptr + t * K + k).to(tl.int64)
        wk = tl.load(w_ptr + t * K + k).to(tl.float32)
        # shrink: hg = A_g[e] x_t, hu = A_u[e] x_t   (R,)
        hg = tl.zeros([RP], dtype=tl.float32)
        hu = tl.zeros([RP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            xv = tl.load(x_ptr + t * D + dd, mask=dmask, other=0.0).to(tl.float32)
            amask = rmask[:, None] & dmask[None, :]
            aoff = e * R * D + rr[:, None] * D + dd[None, :]
            ag = tl.load(ag_ptr + aoff, mask=amask, other=0.0).to(tl.float32)
            au = tl.load(au_ptr + aoff, mask=amask, other=0.0).to(tl.float32)
            hg += tl.sum(ag * xv[None, :], axis=1)
            hu += tl.sum(au * xv[None, :], axis=1)
        # expand for this program's columns: B[e][cols, :] @ h   (BF,)
        boff = e * FF * R + cols[:, None] * R + rr[None, :]
        bmask = fmask[:, None] & rmask[None, :]
        bg = tl.load(bg_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        bu = tl.load(bu_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
        g = g0 + scaling * tl.sum(bg * hg[None, :], axis=1)
        u = u0 + scaling * tl.sum(bu * hu[None, :], axis=1)
        h = _act(g, ACT) * u
        tl.store(h_ptr + (t * K + k) * FF + cols, h.to(h_ptr.dtype.element_ty), mask=fmask)
        mix += wk * h
    tl.store(hmix_ptr + t * FF + cols, mix.to(hmix_ptr.dtype.element_ty), mask=fmask)


def mixlora_expert_hidden(x, g0, u0, a_gate, b_gate, a_up, b_up, idx, weight, scaling, act="silu",
                          block_f: int = 128, block_d: int = 256, num_warps: int = 4):
    """Triton version of ``mixlora_expert_hidden_reference`` (forward only: decode/inference)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; supported: {sorted(ACTIVATIONS)}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("mixlora_expert_hidden needs CUDA tensors (or TRITON_INTERPRET=1)")
    T, D = x.shape
    E, R, _ = a_gate.shape
    FF = b_gate.shape[1]
    K = idx.shape[1]
    if g0.shape != (T, FF) or u0.shape != (T, FF) or a_up.shape != a_gate.shape or b_up.shape != b_gate.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, g0 {tuple(g0.shape)}, u0 {tuple(u0.shape)}, "
                         f"A {tuple(a_gate.shape)}/{tuple(a_up.shape)}, B {tuple(b_gate.shape)}/{tuple(b_up.shape)}")
    x, g0, u0 = x.contiguous(), g0.contiguous(), u0.contiguous()
    h = torch.empty(T, K, FF, dtype=x.dtype, device=x.device)
    h_mix = torch.empty(T, FF, dtype=x.dtype, device=x.device)
    rp = max(16, triton.next_power_of_2(R))
    grid = (T, triton.cdiv(FF, block_f))
    _hidden_kernel[grid](
        x, g0, u0, a_gate.contiguous(), b_gate.contiguous(), a_up.contiguous(), b_up.contiguous(),
        idx.contiguous(), weight.contiguous(), h, h_mix, D, FF, R, K, float(scaling),
        RP=rp, BLOCK_D=block_d, BLOCK_F=block_f, ACT=ACTIVATIONS[act], num_warps=num_warps,
    )
    return h, h_mix
