"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions that cost ~2 µs per call
from Python (measured, triton 3.6/3.9); a decode launcher calls them several times, and eager
decode is bound by host time. These plain-Python versions cost ~30 ns.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n, and at least ``lo`` (block sizes, padded ranks)."""
    n = int(n)
    return max(lo, 1 if n <= 1 else 1 << (n - 1).bit_length())
