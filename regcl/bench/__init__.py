"""Benchmarks: ``regcl bench cl`` (continual learning protocol)."""
