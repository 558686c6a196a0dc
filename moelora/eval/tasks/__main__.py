"""``python -m moelora.eval.tasks OUT_DIR [source ...]`` (see moelora.eval.tasks)."""
from moelora.eval.tasks import main

main()
