"""Benchmarks of metalm-fast (see DESIGN.md, Performance method)."""
