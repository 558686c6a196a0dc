"""``BenchSettings``: everything a benchmark run depends on, in one dataclass.

The same dataclass is

- the Python API: ``run_benchmark(BenchSettings(model="llama2_7b_shape", batch_sizes=(1, 8)))``;
- the Hydra structured config of ``moelora-bench`` (registered in Hydra's ConfigStore as
  ``bench_schema`` by ``register_configs``; ``conf/bench.yaml`` only picks the config groups): every
  field is a ``key=value`` override, an unknown key or a value of the wrong type is an error that
  names the key, and ``--help`` lists the fields;
- the argparse flags of ``python -m moelora.bench`` (``cli.parse_args``): one flag per field,
  built from the fields below (their ``help`` and ``flags`` metadata);
- the ``settings`` record at the top of ``bench.json``.

Defaults are the measurement setup of docs/anchors.md: prompt 64, N = 128 new tokens, rank 16 on
all seven linears, 8 experts, top-2. This module imports no hydra/omegaconf (the GPU machine has
neither) except inside ``register_configs``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METHODS = ("base", "lora", "mixlora", "lora_switch_merge", "lora_switch_unmerged", "reference_mixlora")
MODES = ("eager", "static", "static_new", "compile")
FAMILIES = ("lora", "mixlora", "lora_switch")  # the keys of ``adapters``
SCHEMA_NAME = "bench_schema"


def _f(default: Any = dataclasses.MISSING, help: str = "", *flags: str, cli: bool = True, factory: Any = None):
    """A field with its help text and argparse flags (default: ``--<name with dashes>``; a bool
    that defaults to True gets ``--no-<name>``); ``cli=False``: no flag (Hydra / Python only)."""
    meta = {"help": help, "flags": flags, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _per_family() -> dict[str, dict[str, Any]]:
    return {family: {} for family in FAMILIES}


@dataclass
class BenchSettings:
    """Everything a benchmark run depends on (module docstring); ``validate()`` checks it."""

    model: Any = _f("tiny", "shape (llama2_7b_shape, tiny_shape), 'tiny', 'smollm2' or an HF folder; "
                            "Hydra: the model group (model=llama2_7b_shape)")
    methods: tuple[str, ...] = _f(DEFAULT_METHODS, "methods to measure; base is always measured first (ratios need it)")
    batch_sizes: tuple[int, ...] = _f((1,), "batch sizes, e.g. 1,8,32")
    prompt_lens: tuple[int, ...] = _f((64,), "prompt lengths (random token ids)", "--prompt-len", "--prompt-lens")
    new_tokens: int = _f(128, "N: decode ms/token = (t(N+1 new) - t(1 new)) / N")
    modes: tuple[str, ...] = _f(("eager", "static"), "eager | static (one static cache, reset per call; auto-compiled "
                                                     "on CUDA) | static_new (generate(cache_implementation='static'), "
                                                     "as users call it: the cache is generate's own) | compile "
                                                     "(explicit torch.compile)")
    repeats: int = _f(3, "timed repeats per case (median)")
    warmup: int = _f(1, "untimed (N+1)-token generations per case; compiles happen here")
    rounds: int = _f(1, "the whole method loop this many times, reversed every other round; the summary "
                        "takes medians over rounds")
    paired: bool = _f(True, "eager: time the base beside every repeat of an adapted method (decode_ratio_paired)")
    check_harness: bool = _f(True, "base rows: also time plain generate without the step timer (harness_ratio)",
                             "--no-harness-check")
    decode_graphs: bool = _f(True, "eager decode steps replay adapted modules as CUDA graphs")
    device: str = _f("auto", "auto = cuda if available")
    dtype: str = _f("auto", "auto = bfloat16 on cuda, float32 on cpu")
    seed: int = _f(0, "weights, adapters and prompts")
    r: int = _f(16, "LoRA rank of every adapter family")
    lora_alpha: float = _f(32.0, "LoRA alpha of every adapter family")
    num_experts: int = _f(8, "experts of MixLoRA and LoRA-Switch")
    top_k: int = _f(2, "experts per token of MixLoRA and LoRA-Switch")
    adapters: dict[str, dict[str, Any]] = _f(
        help="per family (lora, mixlora, lora_switch): config fields over the sizes above, e.g. "
             "adapters.mixlora.num_experts=4 (keys: moelora's config dataclasses)", cli=False, factory=_per_family)
    compile_mode: str = _f("default", "torch.compile mode of the compile mode")
    case_timeout_s: float = _f(600.0, "a case still generating after this is stopped and recorded as a timeout")
    time_budget_s: float | None = _f(None, "cases not started within this many seconds are recorded as skipped")
    plots: bool = _f(True, "write latency_vs_batch.png and ratio_to_base.png")
    out_dir: str | None = _f(None, "run directory for bench.json/.csv/plots (Hydra: the run directory)", "--out")
    command: str | None = _f(None, "recorded verbatim; default: this process's command line", cli=False)
    # Hydra's run directory: logs/<task_name>/runs/<time> (conf/hydra/default.yaml, conf/paths/)
    task_name: str = _f("bench", "names the log folder (Hydra)", cli=False)
    paths: Any = _f(None, "the paths group (Hydra)", cli=False)

    def validate(self) -> "BenchSettings":
        """Check every value (errors name the field) and normalise: sequences become tuples,
        methods are deduplicated with base first. Returns self."""
        from moelora.bench.models import METHODS

        for name in ("methods", "batch_sizes", "prompt_lens", "modes"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("new_tokens, repeats and rounds must be >= 1, warmup >= 0")
        if not self.batch_sizes or not self.prompt_lens or min(self.batch_sizes) < 1 or min(self.prompt_lens) < 1:
            raise ValueError("batch_sizes and prompt_lens must be non-empty positive integers")
        bad = [k for k in (self.adapters or {}) if k not in FAMILIES]
        if bad:
            raise ValueError(f"unknown adapter family {bad} in adapters; choose from {list(FAMILIES)}")
        self.methods = ("base",) + tuple(m for m in dict.fromkeys(self.methods) if m != "base")
        return self

    def adapter_configs(self) -> dict[str, dict[str, Any]]:
        """Per family the adapter config (``moelora.config_from_dict`` form): the sizes
        ``r``/``lora_alpha``/``num_experts``/``top_k`` with ``adapters[family]`` on top."""
        from moelora.bench.models import default_adapter_configs

        base = default_adapter_configs(self.r, self.lora_alpha, self.num_experts, self.top_k)
        return {family: {**cfg, **dict((self.adapters or {}).get(family) or {})} for family, cfg in base.items()}

    def record(self) -> dict[str, Any]:
        """What bench.json keeps of the settings (the Hydra-only fields left out), plus the
        resolved adapter configs."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("task_name", "paths")}
        out["adapter_configs"] = self.adapter_configs()
        return out


def cli_fields() -> list[dataclasses.Field]:
    """The fields that have an argparse flag, in declaration order."""
    return [f for f in dataclasses.fields(BenchSettings) if f.metadata.get("cli", True)]


def register_configs() -> None:
    """Register ``BenchSettings`` in Hydra's ConfigStore as ``bench_schema`` (the first entry of
    ``conf/bench.yaml``'s defaults list). ``adapters`` accepts new keys per family
    (``adapters.mixlora.expert_backend=eager``) without ``+``; every other key must exist."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(BenchSettings)
    for family in FAMILIES:
        OmegaConf.set_struct(node.adapters[family], False)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=node)
