"""moelora-leaderboard on real moelora-train outputs (tiny model, CPU) and a real bench.json."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelora.cli import compose_train_config, train
from moelora.eval.leaderboard import LeaderboardError, leaderboard

FAST = ["model.hidden_size=32", "model.intermediate_size=64", "data.n_train=16", "data.n_val=2",
        "data.n_test=4", "data.batch_size=8", "data.eval_batch_size=16", "callbacks.progress_bar.refresh_rate=0",
        "trainer.max_steps=2", "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A sweep-like folder: LoRA and MixLoRA, two seeds each, as moelora-train writes them."""
    root = tmp_path_factory.mktemp("sweep")
    for i, (method, seed) in enumerate([("lora", 1), ("lora", 2), ("mixlora", 1), ("mixlora", 2)]):
        train(compose_train_config([*FAST, f"adapter={method}", f"seed={seed}"], output_dir=root / str(i)))
    # A failed job: listed, not scored.
    (root / "9").mkdir()
    (root / "9" / "results.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad data"}))
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from moelora.bench.latency import run_benchmark
    from moelora.bench.settings import BenchSettings

    out = tmp_path_factory.mktemp("bench")
    run_benchmark(BenchSettings(model="tiny_shape", methods=("base", "lora", "mixlora"), batch_sizes=(1,),
                                prompt_lens=(4,), new_tokens=2, modes=("eager",), repeats=1, warmup=0, r=4,
                                out_dir=str(out), plots=False))
    return out


def test_leaderboard_pools_seeds_pairs_against_lora_and_joins_speed(runs, bench, tmp_path):
    res = leaderboard([runs], [bench], tmp_path)
    rows = res["tables"]["tiny_llama"]
    assert sorted(r["method"].split(" ")[0] for r in rows) == ["lora", "mixlora"]
    assert all(r["seeds"] == 2 for r in rows)
    per_run = {}
    for res_json in runs.glob("[0-3]/results.json"):
        r = json.loads(res_json.read_text())
        per_run.setdefault(r["method"], []).append(r["metrics"]["test/acc"])
    for r in rows:
        accs = per_run[r["method"].split(" ")[0]]
        assert r["acc/mean"] == pytest.approx(sum(accs) / len(accs))
        assert r["decode_x_base_eager"] is not None and r["decode_x_base_eager"] > 0
        assert r["train_tokens_per_s"] and r["train_tokens_per_s"] > 0  # recorded by moelora-train
    mix = next(r for r in rows if r["method"].startswith("mixlora"))
    assert mix["vs_lora_pairs"] == 2 * 5  # 2 seeds x 5 tasks, matched by seed and task
    assert res["skipped"] and "bad data" in res["skipped"][0]["why"]
    md = (tmp_path / "leaderboard.md").read_text()
    assert "## tiny_llama" in md and "Not scored" in md and "Δ vs lora" in md
    with open(tmp_path / "leaderboard.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "leaderboard.png").stat().st_size > 1000


def test_speed_is_not_joined_to_variants_the_benchmark_does_not_time(runs, bench, tmp_path):
    """A dynamic-routing MixLoRA and a block-diagonal MixLoRA run get no speed columns (the bench
    times top-k dense MixLoRA); the plain MixLoRA run still does."""
    sweep = tmp_path / "sweep"
    src = json.loads(next(p for p in sorted(runs.glob("[0-3]/results.json"))
                          if json.loads(p.read_text())["method"] == "mixlora").read_text())
    for name, change in {"plain": {}, "dyn": {"routing_strategy": "dynamic", "top_p": 0.8},
                         "blocks": {"nblocks": 2}}.items():
        (sweep / name).mkdir(parents=True)
        r = {**src, "adapter": {**src["adapter"], **change}}
        (sweep / name / "results.json").write_text(json.dumps(r))
    rows = leaderboard([sweep], [bench], tmp_path / "lb")["tables"]["tiny_llama"]
    by = {r["method"]: r for r in rows}
    assert len(by) == 3, list(by)
    for label, row in by.items():
        timed = row["decode_x_base_eager"] is not None
        assert timed == ("dyn" not in label and "blocks" not in label), (label, row["decode_x_base_eager"])


def test_cli_writes_files_and_rejects_bad_input(runs, tmp_path):
    cmd = [sys.executable, "-m", "moelora.eval.leaderboard", str(runs), "--out", str(tmp_path / "lb")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| method |" in proc.stdout and (tmp_path / "lb" / "leaderboard.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "moelora.eval.leaderboard", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such directory" in bad.stderr
    with pytest.raises(LeaderboardError, match="no results.json"):
        leaderboard([tmp_path / "lb"])


def test_leaderboard_notebook_executes(runs, bench, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    monkeypatch.setenv("MOELORA_LEADERBOARD_RUNS", str(runs))
    monkeypatch.setenv("MOELORA_BENCH_RUN", str(bench))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(notebooks / "03_leaderboard.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(notebooks)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    assert any("tiny_llama" in str(o.get("data", {})) for o in outputs)  # the table was shown


def test_bench_speed_takes_prefill_from_the_base_row_when_a_summary_has_no_ratio():
    """Rows summarised over rounds have prefill_ms but no prefill_ratio (older bench.json files)."""
    from moelora.eval.leaderboard import bench_speed

    common = {"mode": "eager", "batch_size": 1, "prompt_len": 64}
    rows = [{"method": "base", "prefill_ms": 40.0, "decode_ratio": 1.0, **common},
            {"method": "mixlora", "prefill_ms": 60.0, "decode_ratio": 1.1, **common},
            {"method": "lora", "prefill_ms": 50.0, "prefill_ratio": 1.2, "decode_ratio": 1.2, **common},
            {"method": "lora_switch_merge", "prefill_ms": 80.0, "decode_ratio": 1.0, **{**common, "prompt_len": 1024}}]
    speed = bench_speed([{"model": "m", "device": "d", "rows": rows}])
    assert speed["mixlora"]["prefill"] == pytest.approx(1.5)
    assert speed["lora"]["prefill"] == pytest.approx(1.2)  # a recorded ratio wins
    assert speed["lora_switch"]["prefill"] is None  # no base row at its prompt length
