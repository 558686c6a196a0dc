"""Plain LoRA: ``y = W x + s * B (A dropout(x))`` on a frozen ``nn.Linear`` (never copied).

``LoraAdapter`` holds one adapter's A, B and scale; it lives in the ``adapters`` dict of the
``AdaptedLinear`` (``moelora/layers/adapted.py``) that wraps the frozen linear, beside the other
adapters of the model. ``delta`` is the reference math; ``forward_site`` adds the decode fast
paths (kernels, decode graphs, compiled custom ops) for a batch that uses this adapter only.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import _private
from ...layers import decode_graphs
from ...layers.dispatch import decode_kernels_apply
from ...layers.lora_math import adapter_dropout_unscaled, init_lora_, lora_input, resolve_dtype


class LoraAdapter(nn.Module):
    """One LoRA delta of one linear. ``merge``/``unmerge`` fold it into the base weight of its
    site (for adapter-free inference); unmerge restores the exact original weight."""

    kind = "lora"

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str = "kaiming", adapter_dtype: str = "auto") -> None:
        super().__init__()
        self.r = r
        self.scaling = lora_alpha / (r**0.5 if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        dtype = resolve_dtype(adapter_dtype, w)
        out_f, in_f = w.shape
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=w.device))  # (R, in)
        self.lora_B = nn.Parameter(torch.empty(out_f, r, dtype=dtype, device=w.device))  # (out, R)
        init_lora_(self.lora_A, self.lora_B, init_lora_weights, r)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self._merged_stamp = None

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def delta(self, x: torch.Tensor, state=None, name: str | None = None) -> torch.Tensor:
        """The reference math: s * B A dropout(x), for x (..., in) -> (..., out); dropout from
        adapter ``name``'s own stream of the model state ``state`` when given (``adapter_dropout``)."""
        # dropout as x * keep with its 1/(1-p) folded into the scaling, and no fp32 round trip of
        # x under autocast (lora_input): fewer launches per linear, the same math
        x, rescale = adapter_dropout_unscaled(self.lora_dropout, x, state, name)
        h = F.linear(lora_input(x, self.lora_A.dtype), self.lora_A) * (self.scaling * rescale)  # (..., R)
        return F.linear(h, self.lora_B)  # scaled in the rank-R hidden, as the mixed-batch form scales it

    def _decode(self, site, x2: torch.Tensor) -> torch.Tensor:
        """Decode math for x2 (T, in): frozen GEMM + delta through moelora_kernels.ops."""
        from moelora_kernels import ops

        base = site.base_layer
        return ops.linear_with_lora(x2, base.weight, base.bias, self.lora_A, self.lora_B, None, None, self.scaling)

    def forward_site(self, site, x: torch.Tensor) -> torch.Tensor:
        """The site's output when every token of the batch uses this adapter."""
        base = site.base_layer
        lora_A, lora_B = self.lora_A, self.lora_B
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        if not self.merged and lora_A.dtype == x.dtype and decode_kernels_apply(x2, site):
            if torch.compiler.is_compiling():
                # Compiled decode: the delta runs beside the frozen GEMM (moelora_kernels.ops).
                y = self._decode(site, x2)
                return y.view(*x.shape[:-1], y.shape[-1])
            if decode_graphs.applies(x2, site._state):
                # Eager decode step: GEMM + delta replayed as one CUDA graph (decode_graphs).
                y = decode_graphs.graphed(self, lambda t: self._decode(site, t), (x2,),
                                          (base.weight, base.bias, lora_A, lora_B, self.scaling))
                return y.view(*x.shape[:-1], y.shape[-1])
            # Otherwise eager keeps the two torch ops below: a Triton launch costs more host time (~55 µs).
        # F.linear directly, not base(x): eager decode is launch-bound and a module call costs ~10 µs.
        y = F.linear(x, base.weight, base.bias)
        if self.merged:
            return y
        state = site._state
        if lora_A.dtype != y.dtype:
            return y + self.delta(x, state, state.plan.name).to(y.dtype)
        rescale = 1.0
        if self.training:
            x, rescale = adapter_dropout_unscaled(self.lora_dropout, x, state, state.plan.name)
        # Same math in 2 launches instead of 4: h = A x; y += s * B h, in place (out-of-place
        # addmm would first copy y: one more launch per linear, and eager decode is launch-bound).
        h = F.linear(x, lora_A)  # (..., R)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, self.r), lora_B.t(), alpha=self.scaling * rescale)
        return y

    def delta_rows(self, site, x_rows: torch.Tensor, slot: int) -> torch.Tensor:
        """The delta for the tokens of a mixed batch that use this adapter (eager path)."""
        state = site._state
        return self.delta(x_rows, state, state.plan.slot_names[slot])

    # ---- merging (moelora.merge_lora) --------------------------------------------------------
    @torch.no_grad()
    def merge(self, site) -> None:
        """Fold s*B@A into the base weight (fp32 add, one rounding). Merging twice is a no-op."""
        if self.merged:
            return
        w = site.base_layer.weight
        # Keep the original so unmerge is exact: W - dW after rounding would not give W back in bf16.
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self._merged_stamp = _private.tensor_stamp(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, site) -> None:
        """Restore the exact base weight saved by ``merge``. After ``.to()``/``.half()`` the saved
        weight is converted the same way; after the weight was overwritten in place (e.g. by
        ``load_state_dict``) the new values are the base now and are kept, with a warning."""
        if not self.merged:
            return
        w = site.base_layer.weight
        change = _private.stamp_change(w, self._merged_stamp)
        if change == "overwritten":
            warnings.warn("a merged LoRA weight was overwritten in place (load_state_dict?) before unmerge; "
                          "keeping the new values as the base weight", RuntimeWarning, stacklevel=3)
        else:
            w.copy_(self._unmerged_weight.to(device=w.device, dtype=w.dtype))
        self._unmerged_weight = None
        self._merged_stamp = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
