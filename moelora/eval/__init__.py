"""Evaluation of moelora adapters: accuracy (lm-eval), latency, routing analysis.

- ``moelora.eval.harness``: the lm-eval model ``moelora`` (an ``HFLM`` that loads a base model
  and a moelora adapter) and ``evaluate()``, the Python entry point;
- ``moelora.eval.tasks``: lm-eval task YAMLs (synthetic suite, GSM8K, commonsense);
- ``moelora.eval.multiple_choice``: the MixLoRA paper's fast multiple-choice scoring;
- the decode-latency benchmark is its own package, ``moelora.bench`` (plain torch + transformers:
  it must run on machines without hydra / lm-eval / datasets);
- ``moelora.eval.routing``: router statistics per task and layer ("do experts specialise?").

Importing this package registers the model name ``moelora`` with lm-eval (when lm-eval is
installed). lm-eval 0.4.13 has no plugin entry points: its ``lm_eval`` console script only knows
its own registry, so run the CLI through ``python -m moelora.eval.lm_eval`` (same arguments).

Commands (all offline)::

    # accuracy, Hydra: writes results.json/.md, lm_eval_results.json, routing.json/csv
    moelora-eval adapter_dir=logs/train/runs/<run>/adapter tasks=[synthetic,gsm8k] mc_modes=[loglikelihood,fast]
    # accuracy, lm-eval's own CLI: write a task folder, then point --include_path at it
    python -m moelora.eval.tasks /tmp/moelora_tasks synthetic gsm8k arc_easy=/data/arc_easy_test.jsonl
    python -m moelora.eval.lm_eval --model moelora \\
        --model_args pretrained=logs/train/runs/<run>,dtype=float32 \\
        --tasks moelora_synthetic,moelora_gsm8k --include_path /tmp/moelora_tasks --output_path /tmp/out
    # commonsense from the hub (needs hub access): --include_path $(python -c
    #   "import moelora.eval.tasks as t; print(t.HUB_TASK_DIR)") --tasks moelora_commonsense
    # latency (no Hydra needed), or the same through Hydra: moelora-bench model=llama2_7b_shape ...
    python -m moelora.bench --model llama2_7b_shape --batch-sizes 1,8,32 --prompt-len 64 \\
        --new-tokens 128 --modes eager,static --out experiments/latency
"""
from __future__ import annotations

LM_EVAL_MODEL_NAME = "moelora"


def register_lm_eval_model() -> bool:
    """Register ``moelora`` in lm-eval's model registry as a lazy placeholder (cheap: the
    HFLM subclass is imported only when lm-eval asks for it). False when lm-eval is missing."""
    try:
        # lm_eval.models fills the registry with its own lazy entries; import it first, because
        # lm-eval only does so itself while the registry is empty.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target="moelora.eval.harness:MoeLoraLM")
    return True


register_lm_eval_model()

__all__ = ["LM_EVAL_MODEL_NAME", "register_lm_eval_model"]
