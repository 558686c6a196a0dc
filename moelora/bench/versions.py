"""The one version recorder: what every benchmark result is written with.

``record_versions(command)`` returns the versions of torch, CUDA, triton, transformers, moelora
(and the reference ``mixlora`` package when installed), the GPU's name, the git commit of the
moelora checkout (and whether it had uncommitted changes), Python, host, date, working directory
and the exact command line. ``moelora.bench`` (``bench.json``) and every script in
``kernels/benchmarks/`` store it with their numbers.

Versions are read from the installed distributions' metadata, or from ``__version__`` of a module
that is already imported; nothing is imported just to ask (importing triton before
``TRITON_INTERPRET`` is set would fix its mode for the process). A package that is missing gives
None, and so does the git commit outside a git checkout (e.g. a copied tree on a lent machine).
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import moelora

# the keys record_versions always writes (tests check them)
FIELDS = ("torch", "cuda", "triton", "transformers", "moelora", "mixlora", "gpu", "git_commit", "git_dirty",
          "python", "hostname", "date", "cwd", "command")


def package_version(name: str) -> str | None:
    """``name``'s version: ``__version__`` of the imported module, else the installed
    distribution's metadata (the reference ``mixlora`` has no ``__version__``), else None."""
    module = sys.modules.get(name)
    version = getattr(module, "__version__", None) if module is not None else None
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import version as dist_version

        return dist_version(name)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return None


def default_command() -> str:
    """This process's command line as it was typed: ``python -m moelora.bench ...``, ``python
    kernels/benchmarks/x.py ...`` (from ``sys.orig_argv``), or ``prog ...`` for a console script."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and not argv0.endswith(".py") and argv0 != "-c":  # a console script (moelora-bench, pytest)
        return shlex.join([Path(argv0).name, *sys.argv[1:]])
    return shlex.join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]])


def git_commit(path: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: moelora's source);
    ``(None, None)`` outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(status.strip())


def gpu_name() -> str | None:
    """The name of the current CUDA device, None without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def record_versions(command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The versions, GPU, git commit and command of this process (module docstring).
    ``command``: as typed (a string, or the words of it); default ``default_command()``."""
    if command is None:
        command = default_command()
    elif not isinstance(command, str):
        command = shlex.join(command)
    commit, dirty = git_commit()
    return {
        "torch": package_version("torch"),
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "moelora": moelora.__version__,
        "mixlora": package_version("mixlora"),
        "gpu": gpu_name(),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cwd": os.getcwd(),
        "command": command,
    }
