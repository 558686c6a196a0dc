"""Tensor-parallel execution of adapted linears on torch DTensor (``tensor_parallel.py``)."""
