"""What autograd keeps for backward: the unique storages a forward saves, parameters excluded.

    with SavedStorages(model) as saved:
        loss = model(**batch).loss
    saved.nbytes            # bytes autograd holds for backward (each storage once)

Counted through ``torch.autograd.graph.saved_tensors_hooks``: a storage saved by several ops (or
viewed by several saved tensors) counts once; parameters (frozen or trainable) do not count.
Storages are keyed by address, so each one seen is kept alive until the context exits: otherwise a
saved storage freed early (its node dropped) lets the allocator hand its address to a later one,
which would then count as "already seen" (the count varied by ~10% between runs before this).
Used by ``moelora.bench.concurrent_training.step_profile`` and the accuracy study's estimate.
"""
from __future__ import annotations

import torch


class SavedStorages:
    """Context manager recording every storage autograd saves inside it; see the module docstring."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.entries: dict[int, int] = {}  # storage pointer -> bytes
        self._alive: list = []  # the storages seen: no address is reused while counting
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without one storage
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in self._params and ptr not in self.entries:
            self.entries[ptr] = st.nbytes()
            self._alive.append(st)
        return t

    def __enter__(self) -> "SavedStorages":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._alive.clear()

    @property
    def nbytes(self) -> int:
        return sum(self.entries.values())
