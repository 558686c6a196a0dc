"""The MixLoRA paper's fast multiple-choice evaluation: one forward per question.

lm-eval scores a multiple-choice question by the log-likelihood of every full continuation
(one sequence per choice). MixLoRA / moe-peft instead read the logits at the last prompt token,
restricted to the choice labels, and take the argmax: C× fewer sequences and no length bias.

Here the "prompt" is the question plus the part that all continuations share (for
"the correct answer is answer1/answer2" that is "...the correct answer is answer"), and the
labels are the first token where the continuations differ. When every continuation is exactly
one token past that shared part, the log-likelihoods of lm-eval differ only in that token, so
both modes pick the same choice (a test holds them to it). Documents where the continuations do
not split at one distinct token fall back to full continuation log-likelihood (counted).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _encode(tokenizer, text: str) -> list[int]:
    # Same call as lm-eval's HFLM.tok_encode with default arguments: the tokenizer adds its
    # own special prefix (BOS), so contexts match lm-eval's token for token.
    return tokenizer(text)["input_ids"]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def plan_question(tokenizer, prompt: str, continuations: Sequence[str]) -> dict:
    """How one question is scored: ``{"context": ids, "labels": [token per choice]}`` for the
    fast path, or ``{"sequences": [ids per choice], "start": first continuation position}``."""
    seqs = [_encode(tokenizer, prompt + c) for c in continuations]
    shared = _common_prefix(seqs)
    labels = [s[shared] if len(s) > shared else None for s in seqs]
    one_token = all(len(s) == shared + 1 for s in seqs)
    if shared > 0 and one_token and None not in labels and len(set(labels)) == len(labels):
        return {"context": seqs[0][:shared], "labels": labels, "exact": True}
    if shared > 0 and None not in labels and len(set(labels)) == len(labels):
        # Distinct first tokens but longer continuations: still the paper's rule, not lm-eval's.
        return {"context": seqs[0][:shared], "labels": labels, "exact": False}
    start = len(_encode(tokenizer, prompt))
    return {"sequences": seqs, "start": start}


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _last_logits(model, contexts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, V) fp32 logits after the last token of each context."""
    device = next(model.parameters()).device
    ids, mask = _right_pad(contexts, pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    last = mask.sum(1) - 1
    return logits[torch.arange(len(contexts), device=device), last].float()


@torch.no_grad()
def _sequence_logprob(model, seq: Sequence[int], start: int, pad_id: int) -> float:
    device = next(model.parameters()).device
    ids, mask = _right_pad([seq], pad_id, device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0].float(), -1)  # (T, V)
    targets = ids[0, start:]
    return logp[start - 1 : len(seq) - 1].gather(-1, targets[:, None]).sum().item()


def fast_choice_eval(model, tokenizer, docs: Sequence[dict], batch_size: int = 16) -> dict:
    """Accuracy of label-logit scoring over moelora documents (``prompt``, ``mc_choices``,
    ``label``). Returns ``{"acc", "n", "exact", "fallback", "predictions"}``: ``exact`` counts
    documents where this provably agrees with lm-eval's ``acc``; ``fallback`` those scored by
    full log-likelihood because the choices do not split at one token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plans = [plan_question(tokenizer, d["prompt"], d["mc_choices"]) for d in docs]
    preds: list[int | None] = [None] * len(docs)
    fast = [i for i, p in enumerate(plans) if "context" in p]
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(fast), batch_size):
            idx = fast[b : b + batch_size]
            logits = _last_logits(model, [plans[i]["context"] for i in idx], pad_id)
            for row, i in enumerate(idx):
                preds[i] = int(torch.argmax(logits[row, plans[i]["labels"]]).item())
        for i, p in enumerate(plans):
            if "sequences" in p:
                scores = [_sequence_logprob(model, s, p["start"], pad_id) for s in p["sequences"]]
                preds[i] = max(range(len(scores)), key=scores.__getitem__)
    finally:
        model.train(was_training)
    correct = [int(p == d["label"]) for p, d in zip(preds, docs)]
    return {
        "acc": sum(correct) / max(len(docs), 1),
        "n": len(docs),
        "exact": sum(1 for p in plans if p.get("exact")),
        "fallback": sum(1 for p in plans if "sequences" in p),
        "predictions": preds,
    }
