"""Every use of transformers internals by the benchmark, in one place.

Tested with transformers 5.17.0 (the GPU machine, experiments/2026-12-01_*) to 5.24.0 (the CPU
suite). These attributes are not API: a transformers release may rename or drop any of them, and
``tests/test_bench.py::test_transformers_private_attributes_still_exist`` then fails and names
what is gone (``missing_private_api``); fix it here, nowhere else.

- ``_previous_max_cache_length``: the largest static-cache length ``generate`` has seen on a
  model (``GenerationMixin._prepare_static_cache`` keeps it so that a later call does not
  recompile for a new length). The benchmark sets it before every mode (every method and case
  gets the same cache length) and builds its own ``StaticCache`` of that length.
- ``_compiled_call`` / ``_last_compile_config``: the ``torch.compile``'d forward that
  ``PreTrainedModel.get_compiled_call`` caches on the model (static-cache ``generate`` on CUDA).
  Between methods and modes the benchmark drops them, so no method inherits another's graphs.
- ``_cache``: the static-cache slot of older transformers 4.x releases (5.x does not set it);
  dropped too.
"""
from __future__ import annotations

import inspect

CACHE_LENGTH = "_previous_max_cache_length"
COMPILED_CALL = ("_compiled_call", "_last_compile_config")
GENERATE_STATE = (*COMPILED_CALL, CACHE_LENGTH, "_cache")
TESTED = ("5.17.0", "5.24.0")


def set_static_cache_length(model, length: int) -> None:
    """Make every later static-cache ``generate`` on ``model`` use (at least) ``length``."""
    setattr(model, CACHE_LENGTH, length)


def static_cache_length(model) -> int:
    """The static-cache length ``generate`` would use on ``model`` now."""
    return getattr(model, CACHE_LENGTH)


def forget_generate_state(model) -> None:
    """Drop what ``generate`` cached on ``model`` (compiled forward, static-cache length)."""
    for attr in GENERATE_STATE:
        model.__dict__.pop(attr, None)


def missing_private_api() -> list[str]:
    """What of the above the installed transformers no longer has (empty: all there). Reads the
    source of the two methods that own the attributes; cheap, no model needed."""
    import transformers
    from transformers import GenerationMixin, PreTrainedModel

    where = {CACHE_LENGTH: (GenerationMixin, "_prepare_static_cache"),
             **{attr: (PreTrainedModel, "get_compiled_call") for attr in COMPILED_CALL}}
    missing = []
    for attr, (cls, name) in where.items():
        fn = getattr(cls, name, None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            source = ""
        if not source:
            missing.append(f"{cls.__name__}.{name} (which owns {attr}) is gone")
        elif attr not in source:
            missing.append(f"{cls.__name__}.{name} no longer uses {attr}")
    if missing:
        missing = [f"transformers {transformers.__version__} (tested {TESTED[0]}-{TESTED[1]}): {m}; "
                   f"update moelora/bench/_transformers_private.py" for m in missing]
    return missing
