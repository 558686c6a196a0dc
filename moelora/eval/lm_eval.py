"""``python -m moelora.eval.lm_eval ARGS``: lm-eval's own CLI, with the ``moelora`` model registered.

lm-eval 0.4.13 looks models up only in its registry and loads no plugin entry points, so the
plain ``lm_eval`` console script cannot know ``--model moelora``. This module registers it and
then runs lm-eval's CLI unchanged, so every lm-eval flag works::

    python -m moelora.eval.tasks /tmp/moelora_tasks synthetic
    python -m moelora.eval.lm_eval --model moelora \\
        --model_args pretrained=tiny,adapter=logs/train/runs/<run>/adapter,dtype=float32 \\
        --tasks moelora_synthetic --include_path /tmp/moelora_tasks --output_path /tmp/lm_eval_out \\
        --device cpu --batch_size 16
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Register ``moelora`` with lm-eval and run ``lm_eval`` with ``argv`` (default: sys.argv)."""
    from lm_eval.__main__ import cli_evaluate

    import moelora.eval  # noqa: F401  (registers the model)

    if argv is not None:
        # lm-eval's CLI reads sys.argv itself (it inserts the legacy `run` subcommand there).
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
