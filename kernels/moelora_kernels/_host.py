"""Host-side helpers of the launchers: integer arithmetic and the decode kernels' grid split.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions that cost ~2 µs per call
from Python (measured, triton 3.6/3.9); a decode launcher calls them several times, and eager
decode is bound by host time. These plain-Python versions cost ~30 ns.
"""
import torch

from . import backend


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n, and at least ``lo`` (block sizes, padded ranks)."""
    n = int(n)
    return max(lo, 1 if n <= 1 else 1 << (n - 1).bit_length())


def column_groups(T: int, n_cols: int, block: int, device: torch.device, programs: int | None = None,
                  split: bool = False) -> tuple[int, int]:
    """(G, columns per group) of a decode kernel's (T, G) grid: about ``programs`` programs over
    T tokens. Default: about one per SM of ``device`` for the one-launch kernels (each program
    redoes the shrink, so few programs), one column block per program for the split expands
    (their shrink is done: more programs hide latency; with ~5 groups per token at 32 tokens the
    expand took 25 µs on the H100, longer than the GEMM it runs beside)."""
    if programs is None:
        programs = T * cdiv(n_cols, block) if split else backend.sm_count(device)
    g = max(1, min(cdiv(n_cols, block), cdiv(programs, T)))
    per = cdiv(cdiv(n_cols, g), block) * block
    return cdiv(n_cols, per), per
