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
