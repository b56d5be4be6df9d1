"""Benchmarks of metalm-fast (see docs/ARCHITECTURE.md, Performance method)."""
