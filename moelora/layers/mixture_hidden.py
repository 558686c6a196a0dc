"""The elementwise middle of a MixLoRA expert mixture, for a gated MLP whose gate and up
projections both carry experts (the common case):

    pre_g = g0 + dg,  pre_u = u0 + du          g0, u0 (N, F) frozen; dg, du (N, K, F) expert deltas
    h     = act(pre_g) * pre_u                  (N, K, F), one hidden per (token, slot)
    h_mix = sum_k w_k h_k                       (N, F): the frozen down projection runs once on it
    hd    = h * keep                            the down experts' input (keep: their dropout mask)

Eager, that is six or more passes over (N, K, F) tensors forward and more in backward (each pass
over a 4096 x 2 x 11008 bf16 tensor moves ~360 MB: H200, 7B shape, the elementwise kernels were
the largest share of a MixLoRA training step after its GEMMs). ``compiled_hidden`` runs the same
math as one ``torch.compile``'d function (Inductor fuses the passes, forward and backward) inside
``dispatch.compiled_expert_hidden()``; outside it a MixLoRA adapter's fused path
(``methods/mixlora/layer.py``, its only caller so far; the mixed-batch mixture of
``layers/adapted.py`` does not take it yet) runs its eager composition, the twin
(tests/test_mixture_hidden.py compares them). The activation is looked up by name, not the FFN's
module: one compiled function for every layer (a module per layer would be a guard and a
recompile each).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import compiled_hidden_applies

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def hidden_math(g0: torch.Tensor, u0: torch.Tensor, dg: torch.Tensor, du: torch.Tensor, w: torch.Tensor,
                keep: torch.Tensor | None, act: str, want_hd: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h_mix, hd or None) of the module docstring, in the eager composition's order and casts
    (deltas to the frozen dtype, the weights to the hidden's): the function that is compiled."""
    pre_g = g0.unsqueeze(1) + dg.to(g0.dtype)
    pre_u = u0.unsqueeze(1) + du.to(u0.dtype)
    h = _ACTS[act](pre_g) * pre_u
    h_mix = (h * w.to(h.dtype).unsqueeze(-1)).sum(1)
    if not want_hd:
        return h_mix, None
    return h_mix, (h if keep is None else h * keep)


_COMPILED: list = []  # the compiled hidden_math, made on first use (one per process)


def _compiled():
    if not _COMPILED:
        # dynamic: the token count changes every batch; fullgraph: a graph break would silently
        # split the fusion
        _COMPILED.append(torch.compile(hidden_math, dynamic=True, fullgraph=True))
    return _COMPILED[0]


def applies(act: str | None) -> bool:
    """Whether the caller should take ``compiled_hidden`` for an FFN whose activation is ``act``:
    inside ``dispatch.compiled_expert_hidden()`` and for an activation ``hidden_math`` knows. Outside,
    the mixtures run their own eager composition, the twin ``hidden_math`` reproduces."""
    return act in _ACTS and compiled_hidden_applies()


def compiled_hidden(g0, u0, dg, du, w, keep, act: str, want_hd: bool):
    """``hidden_math`` compiled (Inductor fuses its passes, forward and backward)."""
    return _compiled()(g0, u0, dg, du, w, keep, act, want_hd)
