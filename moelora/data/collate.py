"""Tokenisation with loss masks, padding collation, and left-padded generation batches.

A training sequence is ``[special prefix] prompt target EOS``; ``labels`` equal ``input_ids`` on
``target EOS`` and -100 elsewhere, so the loss is the CE of the answer only: no prompt and no
padding (the reference MixLoRA also trains on pad tokens, docs/design.md §1). The special prefix is
whatever the tokenizer puts in front of a text by itself (BOS for Llama-style tokenizers, nothing
for SmolLM2's).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer adds before any text (e.g. [BOS]); any EOS it would append is dropped."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tokenizer.eos_token_id]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so the model learns where an answer ends")
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt: str, max_length: int | None = None) -> list[int]:
    """Prompt ids as the model sees them before the target; left-truncated to ``max_length``."""
    prefix = special_prefix(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        keep = max_length - len(prefix)
        if keep < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the prompt")
        ids = ids[-keep:]
    return prefix + ids


def encode_example(
    tokenizer, ex: Mapping, max_length: int, task_to_idx: Mapping[str, int] | None = None
) -> dict:
    """``{"input_ids", "labels"[, "task_idx"]}`` for one example, at most ``max_length`` long.

    Too-long sequences lose prompt tokens from the left, so the target survives truncation.
    Only a target longer than ``max_length`` itself is clipped (from its end, dropping EOS).
    """
    prefix = special_prefix(tokenizer)
    prompt_ids = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(ex["target"], add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    room = max_length - len(prefix) - 1  # keep at least one prompt token to condition on
    if room < 1:
        raise ValueError(f"max_length={max_length} is too short for a prompt token and a target token")
    target_ids = target_ids[:room]
    budget = max_length - len(prefix) - len(target_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - budget :] if len(prompt_ids) > budget else prompt_ids
    context = prefix + prompt_ids
    out = {"input_ids": context + target_ids, "labels": [IGNORE_INDEX] * len(context) + target_ids}
    if task_to_idx is not None:
        if ex["task"] not in task_to_idx:
            raise ValueError(f"task {ex['task']!r} is not among the known tasks {sorted(task_to_idx)}")
        out["task_idx"] = task_to_idx[ex["task"]]
    return out


class TokenizedDataset(Dataset):
    """Examples encoded once up front; items are ``encode_example`` dicts plus the raw ``example``.

    ``task_names`` fixes the task -> ``task_idx`` numbering (default: sorted task names), so a
    train and a test set built with the same list agree on it.
    """

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int, task_names: Sequence[str] | None = None):
        self.task_names = list(task_names) if task_names is not None else sorted({ex["task"] for ex in examples})
        self.task_to_idx = {name: i for i, name in enumerate(self.task_names)}
        self.features = [
            {**encode_example(tokenizer, ex, max_length, self.task_to_idx), "example": ex} for ex in examples
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, idx: int) -> dict:
        return self.features[idx]


def _padded_length(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class CausalLMCollator:
    """Pad ``input_ids`` (pad id), ``labels`` (-100) and build ``attention_mask``.

    Right padding is for training; left padding lines up prompt ends for generation. The batch
    also carries ``task_idx`` (LongTensor [B]) when every item has one, and the raw examples
    under ``examples`` (a list, left alone by device transfer) for evaluation.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None  # 8/64 keeps tensor-core shapes on GPU

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, features: Sequence[Mapping]) -> dict:
        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = _padded_length(max(len(s) for s in seqs), self.pad_to_multiple_of)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
        for i, (f, seq) in enumerate(zip(features, seqs)):
            span = slice(0, len(seq)) if self.padding_side == "right" else slice(length - len(seq), length)
            input_ids[i, span] = seq
            attention_mask[i, span] = 1
            if "labels" in f:
                labels[i, span] = torch.as_tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all("labels" in f for f in features):
            batch["labels"] = labels
        if all("task_idx" in f for f in features):
            batch["task_idx"] = torch.tensor([f["task_idx"] for f in features], dtype=torch.long)
        if any("example" in f for f in features):
            batch["examples"] = [f.get("example") for f in features]
        return batch


def model_inputs(batch: Mapping) -> dict:
    """The keys of a collated batch that a Hugging Face causal LM's forward accepts."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}


def build_generation_batch(
    tokenizer, examples: Sequence[dict], max_length: int | None = None, pad_to_multiple_of: int | None = None
) -> dict:
    """Left-padded prompts (no targets) ready for ``model.generate(**model_inputs(batch))``.

    Every prompt ends at the last column, so generated tokens start at ``input_ids.shape[1]``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    collate = CausalLMCollator(pad_id, padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    features = [{"input_ids": encode_prompt(tokenizer, ex["prompt"], max_length), "example": ex} for ex in examples]
    return collate(features)


def decode_continuations(tokenizer, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """Generated text after column ``prompt_length``, cut at the first EOS, specials removed."""
    texts = []
    for row in sequences[:, prompt_length:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
