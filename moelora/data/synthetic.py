"""Offline synthetic multi-task suite: the quickstart's and the tests' data.

Five tasks that need different skills, so a router has something to specialise on:

- ``add``       ``add 73+45=`` -> ``118``            two-digit addition with carries
- ``reverse``   ``rev kbqzt=`` -> ``tzqbk``          copy a string backwards
- ``sort``      ``sort 91804=`` -> ``01489``         sort digits
- ``classify``  ``cls banana=`` -> ``odd``           parity of the vowel count (even / odd)
- ``mcq``       ``mcq A13 B27 C40 D51=`` -> ``C``    pick the one even number of four

Prompts stay <= 20 characters and targets <= 6: the sizes are kept small so that a tiny
char-level model makes visible progress on every task within minutes on a CPU.
Everything is generated from ``random.Random`` seeded with a string, which Python hashes with
SHA-512: the same seed gives the same data on every machine and every ``PYTHONHASHSEED``.
A hash of the prompt puts it in train or test, so the splits never overlap.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_VOWELS = set("aeiou")

Sample = tuple[str, str, int | None]  # (prompt, target, gold choice index or None)


@dataclass(frozen=True)
class SyntheticTask:
    """One generator of the suite: ``sample(rng)`` draws one (prompt, target, label)."""

    name: str
    description: str
    sample: Callable[[random.Random], Sample]
    choices: tuple[str, ...] | None = None  # answer strings of a choice task, in label order

    def example(self, rng: random.Random) -> dict:
        prompt, target, label = self.sample(rng)
        return {
            "task": self.name,
            "prompt": prompt,
            "target": target,
            "choices": list(self.choices) if self.choices else None,
            "label": label,
        }


def _add(rng: random.Random) -> Sample:
    # Two-digit operands keep it learnable in minutes and still need carries (10^4 prompts).
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b), None


def _reverse(rng: random.Random) -> Sample:
    s = "".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))
    return f"rev {s}=", s[::-1], None


def _sort(rng: random.Random) -> Sample:
    s = "".join(rng.choices(_DIGITS, k=rng.randint(3, 6)))
    return f"sort {s}=", "".join(sorted(s)), None


def _classify(rng: random.Random) -> Sample:
    word = "".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))
    label = sum(c in _VOWELS for c in word) % 2  # 0 = even, 1 = odd: same order as choices
    return f"cls {word}=", ("even", "odd")[label], label


def _mcq(rng: random.Random) -> Sample:
    # Exactly one even two-digit number among four: the rule picks a unique answer.
    label = rng.randrange(4)
    numbers = [rng.randrange(11, 100, 2) for _ in range(4)]
    numbers[label] = rng.randrange(10, 100, 2)
    options = " ".join(f"{letter}{n}" for letter, n in zip("ABCD", numbers))
    return f"mcq {options}=", "ABCD"[label], label


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("add", "sum of two 0-99 integers", _add),
        SyntheticTask("reverse", "reverse 3-6 lowercase letters", _reverse),
        SyntheticTask("sort", "sort 3-6 digits", _sort),
        SyntheticTask("classify", "parity of the vowel count of a word", _classify, ("even", "odd")),
        SyntheticTask("mcq", "which of A-D is the even number", _mcq, ("A", "B", "C", "D")),
    )
}


def split_of(prompt: str) -> str:
    """"test" for 1 prompt in 8, "train" otherwise, by a hash of the prompt alone.

    Hashing (not sampling order) decides the split, so train and test stay disjoint whatever the
    sizes or seeds asked for: a test prompt never appears in any training set.
    """
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] % 8 == 0 else "train"


def _draw(task: SyntheticTask, rng: random.Random, n: int, split: str) -> list[dict]:
    """``n`` examples of ``split`` with distinct prompts."""
    out: list[dict] = []
    seen: set[str] = set()
    # The smallest prompt space (add) holds 10^4 prompts; the bound trips only for n near it.
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        ex = task.example(rng)
        if ex["prompt"] not in seen and split_of(ex["prompt"]) == split:
            seen.add(ex["prompt"])
            out.append(ex)
    if len(out) < n:
        raise ValueError(f"synthetic task {task.name!r} cannot produce {n} distinct {split} examples; ask for fewer")
    return out


def make_synthetic_suite(
    tasks: Iterable[str] | None = None, n_train: int = 1000, n_test: int = 100, seed: int = 0
) -> dict[str, dict[str, list[dict]]]:
    """Generate ``{task: {"train": [...], "test": [...]}}`` in the unified example schema.

    Deterministic in ``seed``. Each split comes from its own random stream, so asking for more
    training examples extends the list without changing the test set (and vice versa); the
    splits are disjoint by construction (``split_of``).
    """
    names = list(SYNTHETIC_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {sorted(SYNTHETIC_TASKS)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    return {
        name: {
            split: _draw(SYNTHETIC_TASKS[name], random.Random(f"moelora/{seed}/{name}/{split}"), n, split)
            for split, n in (("train", n_train), ("test", n_test))
        }
        for name in names
    }
