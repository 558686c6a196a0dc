"""Prompt templates for the MixLoRA paper's benchmarks, reading rows in their hub schemas.

The prompts follow the commonsense format that MixLoRA / moe-peft train and evaluate with (it
comes from LLM-Adapters' commonsense_170k): the options are named ``Answer1..N`` (``Solution``,
``Ending``, ``Option`` for PIQA, HellaSwag, WinoGrande), an ``Answer format: answer1/answer2/...``
line ends the prompt, and the target is ``the correct answer is answer2``. The ``choices`` of an
example are those answer words (``answer1``...), so generation is scored by which one it names.

Every template turns one hub row into the unified schema
``{"task", "prompt", "target", "choices", "label"}``; ``TEMPLATES[name].format(row)``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Formatted = tuple[str, str, list[str] | None, int | None]  # prompt, target, choices, label


class TemplateError(ValueError):
    """Unknown template name, or a row that does not fit its template (column, label)."""


@dataclass(frozen=True)
class TaskTemplate:
    """A benchmark: where it lives on the hub and how one row becomes an example."""

    name: str
    hub_path: str  # first argument of datasets.load_dataset
    hub_name: str | None  # dataset config ("ARC-Easy", "main") or None
    eval_split: str  # the labeled split papers report on
    columns: tuple[str, ...]  # hub columns the formatter reads
    formatter: Callable[[dict], Formatted]
    train_split: str = "train"

    def format(self, row: dict) -> dict:
        """Turn one hub-schema row into a unified example; TemplateError says what is wrong."""
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise TemplateError(
                f"row for task {self.name!r} lacks column(s) {missing}; expected the hub schema of "
                f"{self.hub_path} with columns {list(self.columns)}, got {sorted(row)}"
            )
        try:
            prompt, target, choices, label = self.formatter(row)
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise TemplateError(f"cannot format row for task {self.name!r}: {err!r}; row={str(row)[:300]}") from err
        return {"task": self.name, "prompt": prompt, "target": target, "choices": choices, "label": label}


def _choice_prompt(instruction: str, word: str, options: Sequence[str], sep: str = " ") -> tuple[str, list[str]]:
    """``instruction`` + ``Word1: a Word2: b`` + ``Answer format: word1/word2`` (reference layout)."""
    names = [f"{word}{i}" for i in range(1, len(options) + 1)]
    listed = sep.join(f"{name.capitalize()}: {text}" for name, text in zip(names, options))
    return f"{instruction}\n\n{listed}\n\nAnswer format: {'/'.join(names)}\n", names


def _answer(choices: list[str], label: int) -> str:
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is outside the {len(choices)} choices (unlabeled split?)")
    return f"the correct answer is {choices[label]}"


def _one_based(value) -> int:
    """Hub labels like "1".."3" (SIQA, WinoGrande) -> 0-based index; "" (test split) fails."""
    if value in ("", None):
        raise ValueError("empty label: this split is unlabeled, use the validation split")
    return int(value) - 1


def _as_bool(value) -> bool:
    if isinstance(value, str):  # CSV exports write True/False/true/1
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a boolean: {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _keyed_choices(row: dict, question: str) -> Formatted:
    """ARC / OpenBookQA: choices {text, label} and an answerKey among the labels (A-E or 1-5)."""
    texts, keys = list(row["choices"]["text"]), [str(k) for k in row["choices"]["label"]]
    if str(row["answerKey"]) not in keys:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {keys}")
    prompt, choices = _choice_prompt(f"Please choose the correct answer to the question: {question}", "answer", texts)
    label = keys.index(str(row["answerKey"]))
    return prompt, _answer(choices, label), choices, label


def _arc(row: dict) -> Formatted:
    return _keyed_choices(row, row["question"])


def _openbookqa(row: dict) -> Formatted:
    return _keyed_choices(row, row["question_stem"])


def _boolq(row: dict, with_passage: bool) -> Formatted:
    question = row["question"].strip().rstrip("?")
    ask = f"answer the following question with true or false, question: {question}?"
    prompt = f"{row['passage'].strip()} After reading this passage, please {ask}" if with_passage else f"Please {ask}"
    choices = ["true", "false"]
    label = 0 if _as_bool(row["answer"]) else 1
    return f"{prompt}\n\nAnswer format: true/false\n", _answer(choices, label), choices, label


def _piqa(row: dict) -> Formatted:
    prompt, choices = _choice_prompt(
        f"Please choose the correct solution to the question: {row['goal']}",
        "solution", [row["sol1"], row["sol2"]], sep="\n\n",
    )
    label = int(row["label"])
    return prompt, _answer(choices, label), choices, label


def _siqa(row: dict) -> Formatted:
    prompt, choices = _choice_prompt(
        f"Please choose the correct answer to the question: {row['context']} {row['question']}",
        "answer", [row["answerA"], row["answerB"], row["answerC"]],
    )
    label = _one_based(row["label"])
    return prompt, _answer(choices, label), choices, label


def _hellaswag(row: dict) -> Formatted:
    # The hub's ctx may carry "[header]"-style markup from WikiHow; the reference keeps it as is.
    context = f"{row['activity_label']}: {row['ctx']}" if row.get("activity_label") else row["ctx"]
    prompt, choices = _choice_prompt(
        f"Please choose the correct ending to complete the given sentence: {context}",
        "ending", list(row["endings"]),
    )
    if row["label"] in ("", None):
        raise ValueError("empty label: the HellaSwag test split is unlabeled, use validation")
    label = int(row["label"])
    return prompt, _answer(choices, label), choices, label


def _winogrande(row: dict) -> Formatted:
    prompt, choices = _choice_prompt(
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        + row["sentence"],
        "option", [row["option1"], row["option2"]],
    )
    label = _one_based(row["answer"])
    return prompt, _answer(choices, label), choices, label


_CALCULATOR = re.compile(r"<<[^>]*>>")


def _gsm8k(row: dict) -> Formatted:
    answer = str(row["answer"])
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '#### <number>' line")
    # <<48/2=24>> calculator annotations are tool calls of the dataset's authors, not text to learn.
    target = _CALCULATOR.sub("", answer).strip()
    return f"Question: {row['question'].strip()}\nAnswer:\n", target, None, None


_ARC_COLUMNS = ("question", "choices", "answerKey")
TEMPLATES: dict[str, TaskTemplate] = {
    t.name: t
    for t in (
        TaskTemplate("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", _ARC_COLUMNS, _arc),
        TaskTemplate("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", _ARC_COLUMNS, _arc),
        # The reference asks BoolQ closed-book; boolq_passage prepends the passage.
        TaskTemplate("boolq", "google/boolq", None, "validation", ("question", "answer"),
                     lambda row: _boolq(row, with_passage=False)),
        TaskTemplate("boolq_passage", "google/boolq", None, "validation", ("question", "passage", "answer"),
                     lambda row: _boolq(row, with_passage=True)),
        TaskTemplate("openbookqa", "allenai/openbookqa", "main", "test",
                     ("question_stem", "choices", "answerKey"), _openbookqa),
        TaskTemplate("piqa", "ybisk/piqa", None, "validation", ("goal", "sol1", "sol2", "label"), _piqa),
        TaskTemplate("siqa", "allenai/social_i_qa", None, "validation",
                     ("context", "question", "answerA", "answerB", "answerC", "label"), _siqa),
        TaskTemplate("hellaswag", "Rowan/hellaswag", None, "validation", ("ctx", "endings", "label"), _hellaswag),
        # moe-peft trains on the debiased WinoGrande config; validation is shared by all configs.
        TaskTemplate("winogrande", "allenai/winogrande", "winogrande_debiased", "validation",
                     ("sentence", "option1", "option2", "answer"), _winogrande),
        TaskTemplate("gsm8k", "openai/gsm8k", "main", "test", ("question", "answer"), _gsm8k),
    )
}

# Names used by moe-peft, lm-eval and the hub for the same tasks.
ALIASES: dict[str, str] = {
    "arc-e": "arc_easy", "arc_e": "arc_easy", "arc-c": "arc_challenge", "arc_c": "arc_challenge",
    "obqa": "openbookqa", "social_i_qa": "siqa", "social_iqa": "siqa",
}

# The commonsense suite of the MixLoRA paper, in its table order.
COMMONSENSE_TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "siqa", "hellaswag", "winogrande",
)


def get_template(name: str) -> TaskTemplate:
    """The template registered as ``name`` (or an alias); TemplateError lists the known ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TEMPLATES:
        raise TemplateError(
            f"unknown task {name!r}; registered templates: {sorted(TEMPLATES)} (aliases: {sorted(ALIASES)})"
        )
    return TEMPLATES[key]
