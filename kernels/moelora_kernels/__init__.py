"""Triton kernels of moelora, each with an eager torch reference in the same module.

One module per op: ``lora_decode`` (the LoRA / LoRA-Switch / MixLoRA-down delta at decode, added
in place), ``mixlora_ffn`` (the MixLoRA FFN hidden at decode, router fused), ``gathered_lora``
(training / prefill shrink+expand over per-token experts, autograd), ``merge`` (LoRA-Switch:
merge the selected experts into the weights). ``ops`` composes the decode kernels with the frozen
GEMMs (eager, CUDA graphs, torch.compile custom ops). ``backend`` says whether Triton runs in its
interpreter and reads the device's SM count; ``tiles`` is the launch-tiles table by GPU family.
``_triton_common`` holds the @triton.jit helpers shared by the decode kernels, ``_host`` the
launchers' host-side helpers.

Import package name is ``moelora_kernels`` (mapped from ``kernels/moelora_kernels`` in
pyproject.toml) so it never shadows the PyPI package ``kernels`` that transformers imports.
"""
