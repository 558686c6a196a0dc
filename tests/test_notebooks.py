"""The analysis notebooks execute on tiny outputs of training, moelora-eval and the benchmark."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moelora
from moelora.bench.latency import run_benchmark
from moelora.bench.settings import BenchSettings
from moelora.data import make_synthetic_suite
from moelora.eval.routing import routing_report, write_routing_report
from moelora.models import build_tiny_model, char_tokenizer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny_outputs(tmp_path_factory) -> dict[str, str]:
    """A routing report, a benchmark run and a training metrics.csv, as the tools write them."""
    root = tmp_path_factory.mktemp("outputs")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny_model()
        moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
        suite = make_synthetic_suite(["add", "reverse", "mcq"], n_train=0, n_test=6)
        report = routing_report(model, char_tokenizer(), {t: s["test"] for t, s in suite.items()})
        write_routing_report(report, root / "eval")
        (root / "eval" / "results.md").write_text("| task | acc |\n|---|---|\n| add | 0.5 |\n")
        run_benchmark(BenchSettings(model="tiny_shape", methods=("base", "lora"), batch_sizes=(1, 2), prompt_lens=(4,),
                                    new_tokens=2, modes=("eager",), repeats=1, warmup=0, r=4, rounds=2,
                                    out_dir=str(root / "bench"), plots=False))
    finally:
        torch.set_num_threads(n_threads)
    train = root / "train"
    train.mkdir()
    (train / "metrics.csv").write_text("step,train/loss,train/aux_loss,router/load_cv,router/entropy\n"
                                       "0,4.1,0.021,0.4,1.3\n1,3.9,0.020,0.3,1.35\n")
    return {"MOELORA_EVAL_RUN": str(root / "eval"), "MOELORA_BENCH_RUN": str(root / "bench"),
            "MOELORA_TRAIN_RUN": str(train)}


@pytest.mark.parametrize("name", ["01_routing_analysis.ipynb", "02_latency_report.ipynb"])
def test_notebook_executes(name, tiny_outputs, monkeypatch):
    for key, value in tiny_outputs.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the plots were drawn
