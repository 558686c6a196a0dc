"""The decode-latency benchmark: base vs LoRA vs MixLoRA vs LoRA-Switch vs reference MixLoRA.

- ``settings``: ``BenchSettings``, the one settings dataclass (Python API, Hydra structured
  config of ``moelora-bench``, argparse flags of ``python -m moelora.bench``, bench.json record);
- ``latency``: ``run_benchmark`` and the timing of one case; ``models``: the random-weight models
  and adapters it times; ``output``: bench.json/.csv, the summary over rounds, plots, the table;
- ``cli``: the two command lines; ``timing``, ``versions``, ``jsonio``: the timing helper, the
  version recorder and the atomic JSON writer, shared with ``kernels/benchmarks/``;
- ``_transformers_private`` / ``_moelora_internals``: every use of transformers internals and of
  moelora internals, one module each.

Commands::

    moelora-bench model=llama2_7b_shape batch_sizes=[1,8,32] modes=[eager,static]
    python -m moelora.bench --model llama2_7b_shape --batch-sizes 1,8,32 --modes eager,static --out DIR

Nothing here imports hydra, omegaconf, lm-eval or datasets except the Hydra entry itself (the
GPU machine has none of them).
"""
from __future__ import annotations

__all__ = ["BenchSettings", "run_benchmark"]


def __getattr__(name: str):  # lazy: ``moelora.bench.timing`` & co. stay cheap to import
    if name == "BenchSettings":
        from moelora.bench.settings import BenchSettings

        return BenchSettings
    if name == "run_benchmark":
        from moelora.bench.latency import run_benchmark

        return run_benchmark
    raise AttributeError(f"module 'moelora.bench' has no attribute {name!r}")
