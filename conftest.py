"""Repo-root pytest configuration, loaded before any test module.

Without CUDA, Triton kernels run in Triton's interpreter. The interpreter has to be chosen before
``triton`` is first imported (triton.language's own @jit helpers are built at import time), and
any test module may import triton indirectly, so it is decided here, first.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
