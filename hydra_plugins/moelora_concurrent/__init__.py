"""``hydra/launcher=concurrent``: every job of a ``moelora-train -m`` sweep trained in one process
over one copy of the base model (``moelora.training.concurrent``). Hydra finds this launcher
because ``hydra_plugins`` is its plugin namespace package (no ``__init__.py`` there on purpose)."""
