"""LightningDataModule: examples from ``moelora.data`` -> training / evaluation DataLoaders.

Splits: ``train`` (tokenized with answer-only labels, seeded resumable shuffle), ``val`` (held out
from the training split, ``n_val`` per task) and ``test`` (the source's evaluation split). Each
evaluation split is served twice: right-padded with labels for the teacher-forced loss
(dataloader 0), and as left-padded prompts for greedy generation and exact match (dataloader 1).
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from moelora.data import (
    CausalLMCollator,
    TokenizedDataset,
    build_generation_batch,
    load_examples,
    make_synthetic_suite,
    mix_tasks,
    score_prediction,
)

from .sampling import ResumableDataLoader, ResumableSampler

SYNTHETIC = "synthetic"
log = logging.getLogger(__name__)


def _take_per_task(rows: Sequence[dict], n: int | None, skip: int = 0) -> dict[str, list[dict]]:
    """Rows grouped by task, keeping rows [skip, skip + n) of each task (n=None: all from skip)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    return {t: r[skip : None if n is None else skip + n] for t, r in sorted(by_task.items())}


class MoeLoraDataModule(pl.LightningDataModule):
    """Multi-task instruction data for adapter training.

    Args:
        source: ``"synthetic"`` (the offline suite), a local json/jsonl/csv/parquet file or folder,
            a registered task (``arc_easy``, ``boolq``, ...) or ``gsm8k_local``; see
            ``moelora.data.load_examples``.
        tasks: synthetic: which tasks (None = all); other sources: the template/task name.
        n_train, n_val, n_test: examples per task (None = all available). ``val`` is held out of
            the training split, so the two never overlap.
        test_split: the split of ``source`` evaluated at the end (``"eval"`` = the template's
            labeled evaluation split; synthetic data has its own disjoint test split).
        test_source: where the test split comes from when it is not ``source`` (a single file
            has no splits: give the test file here, or its rows are also the training rows).
        data_files: explicit files for a registered task when the hub is out of reach.
        max_length: tokens per training sequence (prompt is cut from the left, never the target).
        seed: seeds data generation and the training order (not the model).
    """

    score_fn: Callable[[dict, str], bool] = staticmethod(score_prediction)

    def __init__(
        self,
        source: str = SYNTHETIC,
        tasks: Sequence[str] | str | None = None,
        n_train: int | None = 1000,
        n_val: int | None = 32,
        n_test: int | None = 100,
        test_split: str = "eval",
        test_source: str | None = None,
        data_files: str | Sequence[str] | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.source, self.test_split, self.data_files = source, test_split, data_files
        self.test_source = test_source
        self.tasks = [tasks] if isinstance(tasks, str) else (list(tasks) if tasks is not None else None)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = tokenizer
        self.examples: dict[str, list[dict]] | None = None  # split -> rows
        self.datasets: dict[str, TokenizedDataset] = {}

    # ---- raw examples (no tokenizer needed: config errors surface before the model loads) -----
    def prepare_examples(self) -> dict[str, list[dict]]:
        """Load or generate the examples of every split; raises on unknown tasks / missing files."""
        if self.examples is not None:
            return self.examples
        for name, n in (("n_train", self.n_train), ("n_val", self.n_val), ("n_test", self.n_test)):
            if n is not None and n < 0:
                raise ValueError(f"data.{name} must be >= 0 or null, got {n}")
        if self.source == SYNTHETIC:
            n_train = None if self.n_train is None else self.n_train + (self.n_val or 0)
            suite = make_synthetic_suite(
                self.tasks, n_train=1000 if n_train is None else n_train,
                n_test=100 if self.n_test is None else self.n_test, seed=self.seed,
            )
            train_rows = [row for task in suite.values() for row in task["train"]]
            test = {t: s["test"] for t, s in suite.items()}
        else:
            if self.tasks is not None and len(self.tasks) != 1:
                raise ValueError(f"data.tasks names one template for source {self.source!r}, got {self.tasks}")
            task = self.tasks[0] if self.tasks else None
            load = functools.partial(load_examples, self.source, task=task, data_files=self.data_files, seed=self.seed)
            train_rows = load(split="train")
            if self.test_source is not None:
                test_rows = load_examples(self.test_source, task=task, split=self.test_split, seed=self.seed)
            else:
                test_rows = load(split=self.test_split)
            test = _take_per_task(test_rows, self.n_test)
            overlap = {r["prompt"] for r in train_rows} & {r["prompt"] for rows in test.values() for r in rows}
            if overlap:
                log.warning("%d test prompts also appear in the training data of %s (set data.test_source)",
                            len(overlap), self.source)
        # val = the first n_val rows of each task's training split; train = the rest
        val = _take_per_task(train_rows, self.n_val)
        train = _take_per_task(train_rows, self.n_train, skip=self.n_val or 0)
        empty = sorted(t for t, rows in train.items() if not rows)
        if empty or not train:
            raise ValueError(f"no training examples left for task(s) {empty or self.tasks} after holding out n_val")
        self.examples = {
            "train": mix_tasks(train, seed=self.seed),
            "val": mix_tasks(val, seed=self.seed),
            "test": mix_tasks(test, seed=self.seed),
        }
        return self.examples

    @property
    def task_names(self) -> list[str]:
        rows = self.prepare_examples()
        return sorted({r["task"] for split in rows.values() for r in split})

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def max_target_tokens(self) -> int:
        """Longest tokenized target of the evaluation splits: the greedy generation length."""
        rows = self.prepare_examples()
        targets = {r["target"] for split in ("val", "test") for r in rows[split]}
        return max((len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets), default=1)

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("MoeLoraDataModule needs a tokenizer: call set_tokenizer() first")
        if self.datasets:
            return
        rows = self.prepare_examples()
        names = self.task_names
        self.datasets = {
            split: TokenizedDataset(rows[split], self.tokenizer, self.max_length, task_names=names)
            for split in ("train", "val", "test")
        }

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        sampler = ResumableSampler(len(ds), seed=self.seed, num_replicas=world, rank=rank)
        return ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, collate_fn=self._train_collator(),
            drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders("test")

    def _train_collator(self) -> CausalLMCollator:
        return CausalLMCollator(self._pad_id(), padding_side="right")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        """[teacher-forced loss batches, left-padded generation batches] of ``split``."""
        rows = self.prepare_examples()[split]
        loss_dl = DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                             collate_fn=self._train_collator(), num_workers=self.num_workers)
        gen_dl = DataLoader(rows, batch_size=self.eval_batch_size, shuffle=False,
                            collate_fn=functools.partial(build_generation_batch, self.tokenizer, max_length=self.max_length),
                            num_workers=self.num_workers)
        return [loss_dl, gen_dl]

