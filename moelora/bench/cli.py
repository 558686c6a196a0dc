"""The two command lines of the benchmark, both built on ``BenchSettings``' fields.

- ``moelora-bench key=value ...`` (``hydra_main``): Hydra overrides of the fields, run directory
  ``logs/bench/runs/<time>/``; ``settings_from_config`` turns a composed config into settings
  (what tests call after ``compose("bench", ...)``).
- ``python -m moelora.bench --flag value ...`` (``main``): argparse, one flag per field, no Hydra
  (the GPU machine has neither hydra nor omegaconf); ``--out DIR`` for the files.

Both print the results table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from moelora.bench.settings import BenchSettings, cli_fields, register_configs

log = logging.getLogger("moelora.bench")


# ---- python -m moelora.bench (argparse, no hydra) ---------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# argparse type per field annotation (``from __future__ import annotations``: the strings)
_TYPES = {"tuple[int, ...]": _ints, "tuple[str, ...]": _strs, "int": int, "float": float, "float | None": float}


def build_parser() -> argparse.ArgumentParser:
    from moelora.bench.models import METHODS, MODEL_SHAPES

    p = argparse.ArgumentParser(prog="python -m moelora.bench", description="Decode-latency benchmark of base, "
                                "LoRA, MixLoRA, LoRA-Switch and the reference MixLoRA (moelora.bench).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    more = {"model": f" (shapes: {', '.join(MODEL_SHAPES)})", "methods": f" (comma list of {', '.join(METHODS)})"}
    for f in cli_fields():
        help_ = f.metadata["help"] + more.get(f.name, "")
        if f.type == "bool":
            flags = f.metadata["flags"] or (f"--{'no-' if f.default else ''}{f.name.replace('_', '-')}",)
            p.add_argument(*flags, dest=f.name, action="store_false" if f.default else "store_true", help=help_)
        else:
            flags = f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)
            p.add_argument(*flags, dest=f.name, type=_TYPES.get(f.type, str), default=f.default, help=help_)
    return p


def parse_args(argv: Sequence[str] | None = None) -> BenchSettings:
    return BenchSettings(**vars(build_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m moelora.bench [flags]``: run, print the table last, return the result."""
    from moelora.bench.latency import run_benchmark
    from moelora.bench.output import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = parse_args(argv)
    s.command = "python -m moelora.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = run_benchmark(s)
    print(format_table(result))  # the final table is the last thing printed
    return result


# ---- moelora-bench (Hydra) --------------------------------------------------------------------
def settings_from_config(cfg) -> BenchSettings:
    """The ``BenchSettings`` of a composed ``bench`` config (``moelora-bench``'s, or ``compose``'s
    in tests). Keys that are not fields (``+key=value`` gets them past Hydra) are an error naming
    them; the run directory (``paths.output_dir``) is the output folder unless ``out_dir`` is set;
    the command is ``moelora-bench`` and the overrides."""
    from moelora.eval.cli import _overrides, _plain

    names = [f.name for f in dataclasses.fields(BenchSettings)]
    unknown = sorted(k for k in cfg if k not in names and k != "hydra")
    if unknown:
        raise ValueError(f"unknown bench setting(s) {unknown}: not fields of moelora.bench.settings.BenchSettings "
                         f"({', '.join(names)})")
    values = {k: _plain(cfg[k]) for k in names if k in cfg and k != "paths"}
    values["paths"] = _plain(cfg.get("paths"))
    if values.get("out_dir") is None and cfg.get("paths") is not None:
        values["out_dir"] = str(cfg.paths.output_dir)
    if values.get("command") is None:
        values["command"] = " ".join(["moelora-bench", *_overrides()])
    return BenchSettings(**values).validate()


def _hydra_task(cfg) -> None:
    from moelora.bench.latency import run_benchmark
    from moelora.bench.output import format_table
    from moelora.eval.cli import _fail

    try:
        settings = settings_from_config(cfg)
    except (ValueError, KeyError) as err:
        _fail("moelora-bench", err)
    result = run_benchmark(settings)
    print(format_table(result))  # the final table is the last thing printed


def hydra_main() -> None:
    """``moelora-bench model=llama2_7b_shape batch_sizes=[1,8,32] modes=[eager,static]``"""
    import hydra

    from moelora.eval.cli import CONFIG_PATH

    register_configs()
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")(_hydra_task)()
