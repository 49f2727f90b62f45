"""Benchmarks (measured) with JSON output; entry points live in ``infer/``."""
