"""Functions that moelora's lm-eval task YAMLs call (``!function moelora_hooks.<name>``).

lm-eval resolves ``!function`` against a Python file next to the YAML, so every task folder holds
a one-line ``moelora_hooks.py`` that re-exports this module: the logic lives here, tested once.

Every moelora task document has the unified example schema of ``moelora.data`` plus one column:
``{"task", "prompt", "target", "choices", "label", "mc_choices"}``, where ``mc_choices`` are the
continuations that multiple-choice scoring compares (``None`` for generation tasks).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moelora.data.scoring import score_prediction
from moelora.data.templates import TEMPLATES


def mc_continuations(example: dict) -> list[str] | None:
    """The strings whose likelihood after the prompt decides a multiple-choice example.

    The target names the gold choice at its end ("the correct answer is answer2", or just "C"),
    so each continuation is the target with its choice swapped: the shared part ("the correct
    answer is ") is scored too, exactly as the model was trained to produce it."""
    choices, label = example.get("choices"), example.get("label")
    if not choices or label is None:
        return None
    gold, target = choices[label], example["target"]
    prefix = target[: len(target) - len(gold)] if target.endswith(gold) else ""
    return [prefix + c for c in choices]


def to_doc(example: dict) -> dict[str, Any]:
    """A unified example as an lm-eval document (adds ``mc_choices``)."""
    return {
        "task": example["task"],
        "prompt": example["prompt"],
        "target": example["target"],
        "choices": list(example["choices"]) if example.get("choices") else None,
        "label": example.get("label"),
        "mc_choices": mc_continuations(example),
    }


def process_generation(doc: dict, results: list[str]) -> dict[str, float]:
    """``process_results`` of generation tasks: moelora's scorer (exact match, named choice, or
    GSM8K final number), the same rule moelora-train's ``test/acc`` uses."""
    return {"acc": float(score_prediction(doc, results[0]))}


def _hub_processor(name: str) -> Callable:
    template = TEMPLATES[name]

    def process_docs(dataset):
        """Hub rows -> moelora documents, via the task's prompt template."""
        return dataset.map(lambda row: to_doc(template.format(row)), remove_columns=dataset.column_names)

    process_docs.__name__ = f"process_{name}"
    return process_docs


# process_arc_easy, process_boolq, ...: one per registered template, for the hub task YAMLs.
for _name in TEMPLATES:
    globals()[f"process_{_name}"] = _hub_processor(_name)
