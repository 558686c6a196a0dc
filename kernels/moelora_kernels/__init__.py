"""Triton kernels of moelora, each with an eager torch reference in the same module.

Import package name is ``moelora_kernels`` (mapped from ``kernels/moelora_kernels`` in
pyproject.toml) so it never shadows the PyPI package ``kernels`` that transformers imports.
"""
