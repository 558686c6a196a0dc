"""When the layers take the one-launch decode kernels instead of their torch paths.

One rule for MixLoRA, LoRA-Switch and plain LoRA: inference (no grad, eval mode) with few
tokens, on tensors the kernel backend runs Triton for (``moelora.switches.triton_kernels_for``:
CUDA by default; CPU under the interpreter when asked). Under ``torch.compile`` the kernels
enter the graph as custom ops (``moelora_kernels.ops``), so the same rule holds in eager and
compiled decoding.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..switches import triton_kernels_for

DECODE_MAX_TOKENS = 64  # at or below (decode, small prefill), inference uses the decode kernels


def decode_kernels_apply(x: torch.Tensor, module: nn.Module) -> bool:
    """x: the (tokens, features) input of the layer. Never for DTensors (a tensor-parallel model,
    ``moelora.parallel``): the kernels read local memory, DTensor ops place the collectives."""
    return (not torch.is_grad_enabled() and not module.training and x.shape[0] <= DECODE_MAX_TOKENS
            and not is_dtensor(x) and triton_kernels_for(x))


def is_dtensor(x: torch.Tensor) -> bool:
    return type(x).__name__ == "DTensor" and type(x).__module__.startswith("torch.distributed")


def gathered_kernel_applies(x: torch.Tensor) -> bool:
    """The gathered shrink/expand Triton kernel (training and prefill too), vs its torch reference;
    under torch.compile the reference is traced and fused by Inductor instead."""
    return triton_kernels_for(x) and not torch.compiler.is_compiling()


@contextlib.contextmanager
def _scoped(flags: dict, value: bool) -> Iterator[None]:
    """Set ``flags["on"]`` for the block, restored on exit and on exception."""
    old = flags["on"]
    flags["on"] = bool(value)
    try:
        yield
    finally:
        flags["on"] = old


# Mixed-batch training: the gathered forms (one GEMM pair over all LoRA adapters of a linear, one
# virtual-expert mixture over all MixLoRA adapters of an FFN) unless a test asks for the eager
# loop over adapters, their reference (``eager_mixed_batches``).
_MIXED = {"on": False}


def eager_mixed_batches(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside the block, mixed batches that train run the eager loop over the batch's adapters
    (the reference the gathered forms are tested against)."""
    return _scoped(_MIXED, enabled)


def gathered_mixed_training() -> bool:
    return not _MIXED["on"]


# MixLoRA training: the expert mixture is recomputed in backward (``mix_recompute._MixRecompute``,
# which saves its inputs only, not the (n, K, F) per-slot tensors) unless a test or a benchmark asks
# for the plain composition that autograd differentiates directly, its reference
# (``plain_mixture_backward``).
_PLAIN_BACKWARD = {"on": False}


def plain_mixture_backward(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside the block, MixLoRA training forwards (an adapter's fused path and the mixed-batch
    virtual-expert mixture) run the plain composition, whose activations autograd saves, instead of
    recomputing the expert mixture in backward: the eager twin the recompute's outputs, gradients
    and saved memory are measured against."""
    return _scoped(_PLAIN_BACKWARD, enabled)


def mixture_recompute_enabled() -> bool:
    """Whether the recomputing MixLoRA mixture is switched on (not inside ``plain_mixture_backward``)."""
    return not _PLAIN_BACKWARD["on"]


# Mixed-batch inference: the virtual-expert mixture records each adapter's routing lazily (made on
# first read, from the mixture's tensors: no ops per adapter in the step) unless a test asks for
# the per-adapter loop that records eagerly, its reference (``eager_routing_records``).
_EAGER_RECORDS = {"on": False}


def eager_routing_records(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside the block, the mixed inference mixture records every adapter's routing eagerly, in
    the loop over the batch's adapters (the reference the lazy records are tested against)."""
    return _scoped(_EAGER_RECORDS, enabled)


def lazy_routing_records() -> bool:
    """Whether the mixed inference mixture records routing lazily (not inside ``eager_routing_records``)."""
    return not _EAGER_RECORDS["on"]


# MixLoRA expert hidden (training and prefill): the elementwise part of the mixture (frozen
# pre-activations + expert deltas, activation, product, weighted sum over the slots, the down
# experts' dropout mask) as ONE torch.compile'd function, so Inductor fuses its passes over the
# (tokens, top-k, FFN) tensors in forward and backward (``mixture_hidden``). Off by default until
# the GPU measures it against the eager composition, its twin (``compiled_expert_hidden``).
_COMPILED_HIDDEN = {"on": False}


def compiled_expert_hidden(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside the block, MixLoRA mixtures compute their expert hidden through the compiled
    function of ``moelora.layers.mixture_hidden`` (its eager twin outside)."""
    return _scoped(_COMPILED_HIDDEN, enabled)


def compiled_hidden_applies() -> bool:
    """Whether the compiled expert hidden is switched on (never while the caller is traced)."""
    return _COMPILED_HIDDEN["on"] and not torch.compiler.is_compiling()
