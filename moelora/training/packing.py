"""One forward for many jobs: their micro-batches concatenated, each job's loss from its own rows.

Pure torch (no Lightning, no Hydra): ``moelora.training.concurrent`` trains with it, and the GPU
benchmark (``moelora.bench.concurrent_training``) times exactly this step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moelora.data import IGNORE_INDEX
from moelora.state import BatchPlan


@dataclass
class PackedBatch:
    """``input_ids``/``attention_mask``/``labels`` (B, T) of every job's rows, right-padded to
    the longest; ``adapter_names`` for the forward (one name, or a BatchPlan with a name per row);
    ``rows``: each job's (first row, rows)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    adapter_names: Any
    rows: list[tuple[int, int]]
    host_label_tokens: list[int] | None = None  # counted on the host before the copy to the device

    def label_tokens(self) -> list[int]:
        """Each job's tokens that count in its loss (host ints: for throughput accounting). Counted
        from the host labels at packing time: ``.tolist()`` of device labels would wait for the
        GPU queue every step."""
        if self.host_label_tokens is not None:
            return list(self.host_label_tokens)
        return _per_job(loss_token_counts(self.labels), self.rows)


def loss_token_counts(labels: torch.Tensor) -> list[int]:
    """Per row, the tokens a causal LM's shifted loss counts (labels[:, 1:] that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()


def _per_job(counted: list[int], rows: Sequence[tuple[int, int]]) -> list[int]:
    return [int(sum(counted[r0: r0 + n])) for r0, n in rows]


def pack_micro_batches(batches: Sequence[dict], names: Sequence[str], pad_id: int,
                       device: torch.device | str | None = None,
                       pad_to_multiple_of: int | None = None) -> PackedBatch:
    """Concatenate the right-padded micro-batches of the jobs ``names`` into one batch.

    Padding is masked in attention (0) and labels (-100). With several jobs the plan records each
    job's own length (``BatchPlan.lengths``), so each job draws its dropout masks in the shape of
    its own batch and its numbers do not depend on the other jobs (``AdapterState.dropout``). With
    one job the plan is its name: the uniform path, exactly its solo forward.

    ``pad_to_multiple_of``: the common length rounded up to a multiple (e.g. 64), so that the
    packed shapes repeat from step to step: on a GPU every new token count can mean new Triton
    specialisations (the gathered-LoRA kernels specialise on divisibility by 16), new cuBLAS
    heuristics and new allocator blocks. The extra positions are padding like any other (masked in
    attention and labels) and each job's dropout is drawn in its own length, so the numbers of a
    job do not change; with one job (its dropout drawn in the batch's shape) pass None to keep its
    solo forward exact."""
    length = max(b["input_ids"].shape[1] for b in batches)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids, mask, labels, row_names, own, rows = [], [], [], [], [], []
    start = 0
    for name, b in zip(names, batches):
        extra = length - b["input_ids"].shape[1]  # right padding (the training collator's side)
        ids.append(F.pad(b["input_ids"], (0, extra), value=pad_id))
        mask.append(F.pad(b["attention_mask"], (0, extra), value=0))
        labels.append(F.pad(b["labels"], (0, extra), value=IGNORE_INDEX))
        n = b["input_ids"].shape[0]
        row_names += [name] * n
        own.append(b["input_ids"].shape[1])
        rows.append((start, n))
        start += n
    host_labels = torch.cat(labels)
    label_tokens = _per_job(loss_token_counts(host_labels), rows) if host_labels.device.type == "cpu" else None
    ids, mask, labels = torch.cat(ids).to(device), torch.cat(mask).to(device), host_labels.to(device)
    if len(set(names)) != len(names):
        raise ValueError(f"every job of a packed batch needs its own adapter name, got {list(names)}")
    if len(names) == 1:
        plan: Any = names[0]
    else:
        plan = BatchPlan(None, tuple(row_names), ids.device)
        plan.lengths = tuple(own)
    return PackedBatch(ids, mask, labels, plan, rows, label_tokens)


def per_job_losses(logits: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Each job's causal-LM cross entropy: the mean over its own label tokens (HF's loss, token by
    token, then normalised per job; a job's loss never depends on another job's token count)."""
    target = F.pad(batch.labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    tok_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    out = []
    for r0, n in batch.rows:
        counted = (target[r0: r0 + n] != IGNORE_INDEX).sum()
        out.append(tok_loss[r0: r0 + n].sum() / counted.clamp_min(1))
    return out
