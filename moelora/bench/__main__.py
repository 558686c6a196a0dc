"""``python -m moelora.bench --help``: the benchmark without Hydra (``moelora.bench.cli.main``)."""
from moelora.bench.cli import main

if __name__ == "__main__":
    main()
