"""lm-eval loads ``!function moelora_hooks.*`` from this file; the code is moelora.eval.task_hooks."""
from moelora.eval.task_hooks import *  # noqa: F401,F403
