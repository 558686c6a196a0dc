"""The recomputing MixLoRA expert mixture, shared by a MixLoRA adapter's own fused training path
(``methods/mixlora/layer.py``: ``MixLoraAdapter.mix_hidden``) and the mixed-batch virtual-expert
mixture of concurrent training (``layers/adapted.py``: ``_mixture``). It lives in ``layers`` so
that both import it without a cycle (layers never import the methods or the injection code)."""
from __future__ import annotations

import torch

from .dispatch import mixture_recompute_enabled


def recompute_applies() -> bool:
    """Whether a training forward takes ``_MixRecompute`` (grad on, not inside
    ``dispatch.plain_mixture_backward``, not traced)."""
    return torch.is_grad_enabled() and mixture_recompute_enabled() and not torch.compiler.is_compiling()


class _MixRecompute(torch.autograd.Function):
    """``run(x, idx, w, *tensors)`` -> (h_mix, down_delta) computed without a graph; backward
    recomputes it with one and differentiates (a checkpoint of the expert mixture alone).

    Saved: its inputs only: x (n, D, the frozen gate/up projections' saved input too), the frozen
    pre-activations (n, F), idx/w (n, K), the expert stacks (parameters) and the bool dropout
    masks; not the (n, K, F) per-slot tensors. The frozen GEMMs stay outside (not recomputed).
    Backward runs the same ops as the plain composition (same kernels: ``run`` fixes the
    forward's choice), so gradients match it; eager twin: ``dispatch.plain_mixture_backward()``."""

    @staticmethod
    def forward(ctx, run, x, idx, w, *tensors):  # noqa: D102
        ctx.run = run
        ctx.dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.dev), torch.get_autocast_dtype(ctx.dev))
        ctx.save_for_backward(x, idx, w, *tensors)
        h_mix, down_delta = run(x, idx, w, *tensors)
        ctx.has_down = down_delta is not None
        return (h_mix, down_delta) if down_delta is not None else (h_mix, h_mix.new_zeros(()))

    @staticmethod
    def backward(ctx, g_mix, g_down):  # noqa: D102
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        inputs = [None if t is None else t.detach().requires_grad_(bool(n) and t.is_floating_point())
                  for t, n in zip(saved, need)]
        with torch.enable_grad(), torch.autocast(ctx.dev, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            h_mix, down_delta = ctx.run(*inputs)
        outs, grads = [h_mix], [g_mix]
        if ctx.has_down and g_down is not None:
            outs.append(down_delta)
            grads.append(g_down)
        wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True) if wrt else ())
        res = [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]
        return (None, *res)
