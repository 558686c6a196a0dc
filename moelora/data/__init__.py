"""Data for moelora: sources -> unified examples -> token ids with loss masks -> batches.

Every example, whatever its source, is ``{"task", "prompt", "target", "choices", "label"}``:
the model is trained to produce ``target`` after ``prompt``; choice tasks also name their answer
strings (``choices``) and the gold index (``label``).

    from moelora.data import load_examples, TokenizedDataset, CausalLMCollator
    train = load_examples("synthetic", split="train")
    ds = TokenizedDataset(train, tokenizer, max_length=64)
"""
from .collate import (
    IGNORE_INDEX,
    CausalLMCollator,
    TokenizedDataset,
    build_generation_batch,
    decode_continuations,
    encode_example,
    encode_prompt,
    model_inputs,
)
from .loading import DataSourceError, gsm8k_local_path, load_examples, mix_tasks
from .scoring import extract_choice, extract_number, score_prediction, task_accuracy
from .synthetic import SYNTHETIC_TASKS, SyntheticTask, make_synthetic_suite, split_of
from .templates import ALIASES, COMMONSENSE_TASKS, TEMPLATES, TaskTemplate, TemplateError, get_template

__all__ = [
    "ALIASES", "COMMONSENSE_TASKS", "IGNORE_INDEX", "SYNTHETIC_TASKS", "TEMPLATES",
    "CausalLMCollator", "DataSourceError", "SyntheticTask", "TaskTemplate", "TemplateError", "TokenizedDataset",
    "build_generation_batch", "decode_continuations", "encode_example", "encode_prompt", "extract_choice",
    "extract_number", "get_template", "gsm8k_local_path", "load_examples", "make_synthetic_suite",
    "mix_tasks", "model_inputs", "score_prediction", "split_of", "task_accuracy",
]
