"""Tensor parallelism of adapted models on torch DTensor (issue 18).

``model.py``: the whole model (``parallelize``, following the model's ``base_model_tp_plan``);
``tensor_parallel.py``: one adapted linear in isolation (``TensorParallelLoraLinear``);
``run.py``: the ``torchrun`` launcher.
"""
from .model import FORMS, check_parallelizable, full_adapter_state_dict, parallelize, tp_roles

__all__ = ["FORMS", "check_parallelizable", "full_adapter_state_dict", "parallelize", "tp_roles"]
