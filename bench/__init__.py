"""Benchmarks of the rendered database layer (run with `bench/run`; not part of the tests)."""
