"""``python -m experiments.benchmarks.run_all [--quick]``: the same as ``python -m experiments.benchmarks``."""
from .__main__ import main

if __name__ == "__main__":
    main()
