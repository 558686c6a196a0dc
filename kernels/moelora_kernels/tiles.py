"""The launch tiles of every kernel, by GPU family: one table, one cached lookup.

``lookup(device)`` returns the row of the GPU family of ``device`` (``family`` of
``torch.cuda.get_device_name``: "H200", "H100", else "default"; CPU and the interpreter get
"default"), cached per GPU name, so a launcher pays two dict look-ups, not a property query.
Each row maps a kernel to its launch parameters:

- ``lora_decode`` / ``mixlora_hidden``: the one-launch decode kernels (eager decode);
- ``lora_decode_split`` / ``mixlora_hidden_split``: their two-launch (split) forms, used inside
  CUDA graphs and by the compiled ops; steps ``(min_tokens, config)``, see ``for_tokens``;
- ``gathered_lora``: the gather (decode), tile and segment (training / prefill) shrink and expand
  kernels;
- ``merge``: ``MergePlan``'s tile, warps and programs per SM.

The explicit arguments of the launchers still override a row (the benchmarks sweep them).
Rows are shared dicts: read them, do not change them (tests use ``monkeypatch.setitem``).

Where the values come from (kernels/benchmarks/, experiments/): the split decode tiles are the best
of ``benchmark_decode_kernels.py`` on the H100 at the Llama-2-7B decode shapes at 1 and 8 tokens
(4.1-5.0 µs per delta inside a CUDA graph). From 16 tokens on, the split grids (one program per
token and column block: 32 x 64 programs for a 4096-wide expand at 32 tokens) run several waves of
8-warp programs, each a short chain of dependent loads, so wider blocks of few warps win: at 32
tokens on the H200 (``--warps``, experiments/2026-12-01_decode_latency) the per-slot down delta took
18.3 µs at 64 cols x 8 warps, 15.7 at 64 x 4, 10.6 at 128 x 2; the MoE hidden kernel 32.0 / 30.2 /
28.8 µs (128 cols x 8 / 4 / 2 warps); at 1 token 8 warps stay best. The merge tiles are the best of
``benchmark_merge.py --sweep`` on the H100 (10.9 ms for the 12.9 GB of Llama-2-7B, 80% of the copy
bandwidth). All rows start as that H100/H200 tuning; give a family its own row once it is tuned.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from . import backend

__all__ = ["TABLE", "DEFAULT", "family", "lookup", "for_tokens"]

DEFAULT = "default"

_HOPPER: dict[str, Any] = {
    "lora_decode": dict(block_n=128, block_d=1024, num_warps=4),
    "lora_decode_split": (
        (1, dict(chunk=256, block_n=64, num_warps=8, shrink_warps=4)),
        (16, dict(chunk=256, block_n=128, num_warps=2, shrink_warps=4)),
    ),
    "mixlora_hidden": dict(block_f=128, block_d=1024, num_warps=8),
    "mixlora_hidden_split": (
        (1, dict(chunk=256, block_f=128, num_warps=8, shrink_warps=4)),
        (16, dict(chunk=256, block_f=128, num_warps=2, shrink_warps=4)),
    ),
    "gathered_lora": dict(
        gather_bk=128, gather_shrink_warps=4, gather_bn=64, gather_expand_warps=4,
        # tile shrink: 64-token tiles while E_pad*R_pad <= 128 columns, else 32
        tile_bm=64, tile_bm_wide=32, tile_bk=64, tile_shrink_warps=4,
        tile_expand_bm=64, tile_expand_bn=128, tile_expand_warps=8,
        # segment (many experts): tiles of one expert's slots
        segment_bm=64, segment_bk=64, segment_shrink_warps=4,  # segment_bm: shrink and expand
        segment_expand_bn=128, segment_expand_warps=4,
        waves=2,  # split the shrink over IN until about this many waves of programs run
        max_split=16,  # the consumers re-read every partial, so keep the split bounded
    ),
    "merge": dict(block_m=32, block_n=256, num_warps=4, programs_per_sm=8),
}

# Family -> row; a family matches when its name stands as a word in the device name
# ("NVIDIA H100 80GB HBM3" -> "H100"; "NVIDIA GH200 ..." matches neither). First match wins.
TABLE: dict[str, dict[str, Any]] = {"H200": _HOPPER, "H100": _HOPPER, DEFAULT: _HOPPER}


def family(gpu_name: str) -> str:
    """The TABLE key for a ``torch.cuda.get_device_name`` string; unknown (or "") -> "default"."""
    for fam in TABLE:
        if fam != DEFAULT and re.search(rf"\b{re.escape(fam)}\b", gpu_name):
            return fam
    return DEFAULT


_ROWS: dict[str, dict[str, Any]] = {}


def lookup(device: torch.device) -> dict[str, Any]:
    """The TABLE row for ``device``, cached per GPU name (CPU / interpreter: the default row)."""
    name = backend.gpu_name(device)
    row = _ROWS.get(name)
    if row is None:
        row = _ROWS[name] = TABLE[family(name)]
    return row


def for_tokens(steps, tokens: int) -> dict[str, int]:
    """The config of the last ``(min_tokens, config)`` step with min_tokens <= tokens."""
    cfg = steps[0][1]
    for lo, c in steps:
        if tokens >= lo:
            cfg = c
    return cfg
