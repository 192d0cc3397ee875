"""Benchmarks of deq_jax: one module per question, each printing a markdown table.

Run them all with ``python -m experiments.benchmarks [--quick]``.
"""
