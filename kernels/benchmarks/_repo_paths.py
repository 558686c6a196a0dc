"""Imported first by the scripts in this folder: ``moelora_kernels`` (kernels/) and ``moelora``
(the repo root, appended: an installed moelora wins) importable without an install, so that
``python kernels/benchmarks/<script>.py`` works from a plain checkout."""
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parents[1]
if str(_KERNELS) not in sys.path:
    sys.path.insert(0, str(_KERNELS))
if str(_KERNELS.parent) not in sys.path:
    sys.path.append(str(_KERNELS.parent))
