"""Operator commands off the serving path: the benchmark and the keys CLI."""
