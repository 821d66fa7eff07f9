"""Benchmarks behind `emrun bench ...`: each returns a dict the CLI prints (and as JSON)."""
