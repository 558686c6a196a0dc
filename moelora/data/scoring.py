"""Scoring generated text against unified-schema examples.

Rules, in order:
1. exact match of the stripped prediction and target (the synthetic tasks' metric);
2. choice tasks: the first answer string of ``choices`` mentioned in the prediction (as a whole
   word) must be the gold one, so "the correct answer is answer2" and "answer2" both count;
3. GSM8K-style targets ("... #### 42"): the final numbers must be equal.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_choice(choices: Sequence[str], text: str) -> int | None:
    """Index of the choice that ``text`` mentions first (as a whole word), or None.

    Case-insensitive unless a choice is a single character: "a" in "a cat" must not read as "A".
    """
    flags = re.IGNORECASE if all(len(c) > 1 for c in choices) else 0
    hits = []
    for idx, choice in enumerate(choices):
        m = re.search(rf"(?<!\w){re.escape(choice)}(?!\w)", text, flags=flags)
        if m:
            hits.append((m.start(), -len(choice), idx))  # earliest wins, then the longest
    return min(hits)[2] if hits else None


def extract_number(text: str) -> float | None:
    """The answer number of a GSM8K-style text: the first after '####', else the last number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    try:
        return float(found[0].replace(",", "")) if found else None
    except ValueError:
        return None


def score_prediction(example: dict, prediction_text: str) -> bool:
    """True when ``prediction_text`` (the generated continuation of the prompt) is correct."""
    pred, target = prediction_text.strip(), example["target"].strip()
    if pred == target:
        return True
    choices, label = example.get("choices"), example.get("label")
    if choices and label is not None:
        return extract_choice(choices, pred) == label
    if "####" in target:
        gold = extract_number(target)
        return gold is not None and extract_number(pred) == gold
    return False


def task_accuracy(examples: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Per-task accuracy of ``predictions`` plus ``"all"`` (mean over examples)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        hits[ex["task"]].append(score_prediction(ex, pred))
    out = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    if examples:
        out["all"] = sum(sum(h) for h in hits.values()) / len(examples)
    return out
