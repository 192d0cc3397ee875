"""Runs every benchmark and prints their tables: ``python -m experiments.benchmarks [--quick]``.

Usage:
  python -m experiments.benchmarks [--quick] [--repeats N] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import importlib
import time

from . import common

BENCHMARKS = ("ops", "solver_overhead", "vs_pytorch", "vs_jax_peers", "memory", "scaling", "backward_scale",
              "jacobian_cost", "broyden_cost", "mdeq_cost", "forward_mode", "anderson_ridge",
              "gradient_quality", "reversible_error")


def run_all(quick: bool = False, repeats: int | None = None, only=None) -> dict[str, common.Result]:
    """Runs the benchmarks named in ``only`` (all by default), in order.

    Args:
      quick: tiny sizes (checks that everything runs; the numbers mean nothing).
      repeats: timed rounds per measurement (default: each benchmark's).
      only: names from ``BENCHMARKS``.

    Returns:
      name -> :class:`common.Result`.
    """
    results = {}
    for name in only or BENCHMARKS:
        module = importlib.import_module(f"{__package__}.{name}")
        start = time.perf_counter()
        results[name] = module.run(quick=quick, repeats=repeats)
        print(results[name].markdown())
        print(f"\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    return results


def main(argv=None) -> dict[str, common.Result]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures nothing")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5, quick: 2)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--synthetic-data", action="store_true",
                        help="random pixels where a benchmark needs CIFAR-10 images (else missing data is an error)")
    flags = parser.parse_args(argv)
    with common.synthetic_data(flags.synthetic_data):
        return run_all(flags.quick, flags.repeats, flags.only)


if __name__ == "__main__":
    main()
